"""Prompt-token counting for the split decision.

With the model's tokenizer available locally (``transformers`` installed and the tokenizer files
on disk: the config's ``tokenizer``), prompts are tokenized. Otherwise the count is a byte-based
estimate, ``ceil(utf8_bytes / 4)``: about 4 bytes per token is the usual rule of thumb for BPE
vocabularies on English text, and the simulated worker counts the same way. The method in use is
the ``method`` label of ``tandem_router_prompt_tokens``.

Chat requests count their messages' text plus 4 tokens of template per message and 3 for the
assistant turn (the simulated worker's rule, close to Llama 3's and ChatML's templates).
A body the router cannot read counts 0 tokens; the worker then answers with its own 400.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_ASSISTANT_PRIMING = 3

METHOD_BYTES = "bytes"
METHOD_TOKENIZER = "tokenizer"

Encode = Callable[[str], int]


def estimate_bytes(text: str) -> int:
    """``ceil(utf8_bytes / 4)``; 0 for an empty string."""
    return (len(text.encode("utf-8")) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


class TokenCounter:
    """Counts a request's prompt tokens with ``encode`` (a tokenizer) or the byte estimate."""

    def __init__(self, encode: Encode | None = None) -> None:
        self.encode: Encode = encode or estimate_bytes
        self.method = METHOD_TOKENIZER if encode is not None else METHOD_BYTES

    def text(self, text: str) -> int:
        return self.encode(text) if text else 0

    def completion(self, body: Mapping[str, Any]) -> int:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.text(prompt)
        if isinstance(prompt, list):
            if prompt and all(isinstance(t, int) for t in prompt):
                return len(prompt)  # token ids
            total = 0  # a batch: strings or lists of token ids
            for item in prompt:
                if isinstance(item, str):
                    total += self.text(item)
                elif isinstance(item, list):
                    total += len(item)
            return total
        return 0

    def chat(self, body: Mapping[str, Any]) -> int:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        total = CHAT_TOKENS_ASSISTANT_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += CHAT_TOKENS_PER_MESSAGE
            content = message.get("content")
            if isinstance(content, str):
                total += self.text(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += self.text(part["text"])
        return total


def load_counter(tokenizer: str | None) -> TokenCounter:
    """A counter using ``tokenizer`` (a local path or a cached model name, never downloaded) when
    ``transformers`` is importable and the files are there, else the byte estimate.

    Blocking (reads files): call it at start-up or from a thread."""
    if not tokenizer:
        return TokenCounter()
    try:
        transformers = importlib.import_module("transformers")
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except Exception as exc:  # ImportError, OSError (files missing), anything the library raises
        logger.warning(
            "Fell back to the byte-based token estimate: tokenizer %r unavailable (%s)", tokenizer, exc
        )
        return TokenCounter()

    def encode(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    logger.info("Loaded tokenizer %s for prompt-token counts", tokenizer)
    return TokenCounter(encode)
