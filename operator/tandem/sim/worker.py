"""The simulated worker: an OpenAI-compatible HTTP server that behaves like one vLLM engine.

It serves ``/v1/completions`` and ``/v1/chat/completions`` (streaming and not), ``/v1/models``,
``/health``, ``/ready`` (and ``/readyz``), ``/metrics`` (vLLM's metric names, types, labels and buckets)
and ``/sim/info`` (its own configuration), and it times every request with the performance model
(`tandem.perf.model`) through the continuous-batching engine in `tandem.sim.worker_engine`.

Behaviour worth knowing (see ``worker-images/sim-worker/README.md`` for the env/port contract):

* Generated text is deterministic filler, one word per token. Every request generates exactly
  ``max_tokens`` tokens (as with vLLM's ``ignore_eos``); ``finish_reason`` is ``"length"``. ``max_tokens``
  defaults to 16, as in OpenAI's completions API, for chat as well.
* Prompt tokens: a list of token ids counts its length; text counts ``ceil(utf8_bytes / 4)`` tokens (the
  usual rule of thumb for BPE vocabularies on English text). A chat request counts the text of every
  message plus 4 tokens of template per message and 3 for the assistant turn.
* P/D disaggregation follows vLLM's NIXL connector protocol (see the toy proxy in vLLM's
  ``tests/v1/kv_connector/nixl_integration``): a request with ``kv_transfer_params.do_remote_decode`` is
  prefilled and its response carries the ``kv_transfer_params`` the decode worker needs; a request with
  ``do_remote_prefill`` skips the prefill, pulls the KV (modelled transfer time) and decodes. Every role
  serves every request, as vLLM does; the role only says what the router should send.
* A client that disconnects aborts its request and frees its slot and KV blocks.
* Latencies in ``/metrics`` are model seconds: wall time divided by the time scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from tandem.perf import model as perf
from tandem.perf.catalog import Accelerator, get_accelerator
from tandem.perf.models import ModelArch, get_model
from tandem.sim.worker_engine import (
    DEFAULT_BLOCK_SIZE,
    Engine,
    EngineConfig,
    KvFetcher,
    PrefillChunk,
    RequestRejected,
    Role,
    SimRequest,
    classify_kv_params,
)
from tandem.sim.worker_metrics import CONTENT_TYPE_LATEST, WorkerMetrics

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # vLLM's default, and tandem.names.PORT_HTTP
DEFAULT_MAX_TOKENS = 16  # OpenAI completions' default
DEFAULT_KV_LINK_GBS = 25.0  # one 200 Gb/s RDMA NIC per worker
DEFAULT_KV_PORT = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
BYTES_PER_TOKEN = 4  # text prompts: ceil(utf8 bytes / 4) tokens
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_ASSISTANT_PRIMING = 3

# The environment contract (also in worker-images/sim-worker/README.md). CLI flags win over these.
ENV_PREFIX = "TANDEM_SIM_"
ENV_POD_IP = "POD_IP"  # fallback for the advertised KV host (downward API)

FILLER_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
    "simulated", "tokens", "flow", "from", "prefill", "to", "decode", "across", "every", "pool",
)  # fmt: skip


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker is configured with (`parse_settings` reads CLI flags and env)."""

    model: str = "llama-3.1-8b"
    accelerator: str = "h100"
    tp: int = 1
    role: Role = Role.MIXED
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    time_scale: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's, capped by the KV cache
    served_model_name: str | None = None  # default: the model preset's name
    engine_id: str | None = None  # default: the host name (the pod name)
    engine_index: str = "0"  # the `engine` label of the metrics
    kv_host: str | None = None  # default: $POD_IP, else 127.0.0.1
    kv_port: int = DEFAULT_KV_PORT
    kv_link_gbs: float = DEFAULT_KV_LINK_GBS
    num_gpu_blocks: int | None = None  # default: the performance model's KV capacity / block size
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: str | None = None  # default: the preset's
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    kv_sidecar: str | None = None  # URL of a KV-transfer sidecar: pull real bytes through it (worker_kv)
    # URL at which decode workers reach this worker's sidecar, when not ``http://<kv host>:8200`` (pods
    # sharing one loopback, as the e2e fleet agent runs them): sent in ``kv_transfer_params``
    kv_sidecar_advertise: str | None = None
    kv_verify: bool = False  # the sidecar checks each pulled prompt against the prefill's pattern


class PerfTimingModel:
    """The engine's `TimingModel`, backed by `tandem.perf.model` for one accelerator, model and TP."""

    def __init__(self, acc: Accelerator, arch: ModelArch, tp: int, link_gbs: float) -> None:
        self.acc = acc
        self.arch = arch
        self.tp = tp
        self.link_gbs = link_gbs
        self.profile = perf.build_profile(acc, arch, tp)

    def iteration_seconds(self, prefill: Sequence[PrefillChunk], decode_context: Sequence[int]) -> float:
        """One fused forward pass (`perf.PerfProfile.iteration`): the weights are read once, the prefill
        and decode tokens share the compute. A chunk of ``n`` tokens after ``c`` cached ones attends to
        ``n * c + n * n / 2`` (query, key) pairs, which makes a whole prompt cost `perf.prefill_seconds`."""
        new_tokens = sum(chunk.tokens for chunk in prefill)
        pairs = sum(chunk.tokens * chunk.cached + chunk.tokens * chunk.tokens / 2.0 for chunk in prefill)
        return self.profile.iteration(new_tokens, pairs, len(decode_context), sum(decode_context))

    def kv_transfer_seconds(self, tokens: int) -> float:
        # vLLM's NIXL connector pulls after the prefill finished: nothing overlaps the transfer.
        return perf.kv_transfer_seconds(self.arch, tokens, self.link_gbs, pipelined=False)

    def kv_capacity_tokens(self) -> int:
        return perf.kv_capacity_tokens(self.acc, self.arch, self.tp)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class SimWorker:
    """One simulated engine and its HTTP surface."""

    def __init__(self, settings: WorkerSettings, *, kv_fetcher: KvFetcher | None = None) -> None:
        self.settings = settings
        self.arch = get_model(settings.model, settings.dtype)
        self.acc = get_accelerator(settings.accelerator)
        self.timing = PerfTimingModel(self.acc, self.arch, settings.tp, settings.kv_link_gbs)
        if settings.num_gpu_blocks is not None:
            num_blocks = settings.num_gpu_blocks
        else:
            num_blocks = self.timing.kv_capacity_tokens() // settings.block_size
        if num_blocks <= 0:
            raise ValueError(
                f"{self.arch.name} does not fit on {settings.tp} x {self.acc.name}: no room for a KV cache"
            )
        capacity = num_blocks * settings.block_size
        max_model_len = min(settings.max_model_len or self.arch.max_model_len, capacity)
        self.served_model_name = settings.served_model_name or self.arch.name
        self.engine_id = settings.engine_id or socket.gethostname()
        self.created = int(time.time())
        config = EngineConfig(
            num_blocks=num_blocks,
            block_size=settings.block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=max_model_len,
            time_scale=settings.time_scale,
            engine_id=self.engine_id,
            tp_size=settings.tp,
            kv_host=settings.kv_host or os.environ.get(ENV_POD_IP) or "127.0.0.1",
            kv_port=settings.kv_port,
            kv_sidecar_url=settings.kv_sidecar_advertise,
        )
        self.metrics = WorkerMetrics(
            model_name=self.served_model_name,
            engine=settings.engine_index,
            max_model_len=max_model_len,
            cache_config={
                "block_size": str(settings.block_size),
                "cache_dtype": "fp8" if self.arch.kv_bytes_per_elem == 1 else "auto",
                "enable_prefix_caching": "False",
                "gpu_memory_utilization": "0.9",
                "num_gpu_blocks": str(num_blocks),
                "num_cpu_blocks": "None",
            },
        )
        if kv_fetcher is None and settings.kv_sidecar:
            from tandem.sim.worker_kv import SidecarKvFetcher

            kv_fetcher = SidecarKvFetcher(settings.kv_sidecar, verify=settings.kv_verify)
        self.engine = Engine(config, self.timing, fetcher=kv_fetcher, observer=self.metrics)

    # ------------------------------------------------------------------------------ application

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/ready", self.handle_ready)
        app.router.add_get("/readyz", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/sim/info", self.handle_info)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()
        logger.info(
            "Started simulated %s worker %s: %s on %d x %s, %d KV blocks, time scale %g",
            self.settings.role,
            self.engine_id,
            self.arch.name,
            self.settings.tp,
            self.acc.name,
            self.engine.config.num_blocks,
            self.settings.time_scale,
        )

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()

    # --------------------------------------------------------------------------------- handlers

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.alive else 503)

    async def handle_ready(self, _request: web.Request) -> web.Response:
        if not self.engine.alive:
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_models(self, _request: web.Request) -> web.Response:
        card = {
            "id": self.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.arch.name,
            "parent": None,
            "max_model_len": self.engine.config.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def handle_info(self, _request: web.Request) -> web.Response:
        config = self.engine.config
        return web.json_response(
            {
                "role": str(self.settings.role),
                "model": self.arch.name,
                "served_model_name": self.served_model_name,
                "accelerator": self.acc.name,
                "tp": self.settings.tp,
                "engine_id": self.engine_id,
                "time_scale": config.time_scale,
                "num_gpu_blocks": config.num_blocks,
                "block_size": config.block_size,
                "kv_capacity_tokens": config.num_blocks * config.block_size,
                "max_model_len": config.max_model_len,
                "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.max_num_batched_tokens,
                "kv_host": config.kv_host,
                "kv_port": config.kv_port,
            }
        )

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await _read_json(request)
            self._check_model(body)
            prompt_tokens = count_chat_tokens(body) if chat else count_prompt_tokens(body)
            max_tokens = _max_tokens(body, chat=chat, default=self.settings.default_max_tokens)
            if body.get("n") not in (None, 1):
                raise BadRequest("The simulated worker supports n=1 only.")
            kv_params = body.get("kv_transfer_params")
            if kv_params is not None and not isinstance(kv_params, dict):
                raise BadRequest("kv_transfer_params must be an object.")
            prefix = "chatcmpl" if chat else "cmpl"
            header_id = request.headers.get("X-Request-Id")
            suffix = uuid.uuid4().hex[:8] if header_id else uuid.uuid4().hex
            sim = SimRequest(
                request_id=f"{prefix}-{header_id}-{suffix}" if header_id else f"{prefix}-{suffix}",
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
                kv_mode=classify_kv_params(kv_params),
                kv_params=kv_params,
            )
            self.engine.submit(sim)
        except RequestRejected as exc:
            return _error(BadRequest(str(exc)))
        except BadRequest as exc:
            return _error(exc)
        responder = _Responder(self, sim, chat=chat, created=int(time.time()))
        try:
            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return await responder.stream(request, include_usage=include_usage)
            return await responder.complete()
        finally:
            # Reached with the request unfinished only if the client went away (the handler was
            # cancelled or a write failed): free its slot and blocks, as vLLM aborts it.
            if not sim.finished:
                self.engine.abort(sim)

    def _check_model(self, body: Mapping[str, Any]) -> None:
        name = body.get("model")
        if name is not None and name not in (self.served_model_name, self.arch.name):
            raise BadRequest(f"The model `{name}` does not exist.", status=404, kind="NotFoundError")


class _Responder:
    """OpenAI response shapes for one request."""

    def __init__(self, worker: SimWorker, sim: SimRequest, *, chat: bool, created: int) -> None:
        self.worker = worker
        self.sim = sim
        self.chat = chat
        self.created = created
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.sim.request_id,
            "object": obj,
            "created": self.created,
            "model": self.worker.served_model_name,
        }

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.sim.prompt_tokens,
            "completion_tokens": self.sim.num_generated,
            "total_tokens": self.sim.prompt_tokens + self.sim.num_generated,
        }

    async def complete(self) -> web.Response:
        text = "".join([filler_token(i) async for i in self.sim.tokens()])
        if self.sim.finish_reason == "abort":
            return _error(BadRequest("The request was aborted.", status=500, kind="InternalServerError"))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self.sim.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["stop_reason"] = None
        body = {
            **self._head(self.object),
            "choices": [choice],
            "usage": self._usage(),
            "kv_transfer_params": self.sim.kv_transfer_result,
        }
        return web.json_response(body)

    async def stream(self, request: web.Request, *, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            await _send(response, {**self._head(obj), "choices": [{**first, "finish_reason": None}]})
        try:
            async for index in self.sim.tokens():
                last = index + 1 >= self.sim.max_tokens
                if self.chat:
                    choice: dict[str, Any] = {"index": 0, "delta": {"content": filler_token(index)}}
                else:
                    choice = {"index": 0, "text": filler_token(index)}
                choice.update(logprobs=None, finish_reason="length" if last else None, stop_reason=None)
                await _send(response, {**self._head(obj), "choices": [choice]})
            if self.sim.finish_reason == "length":
                if include_usage:
                    await _send(response, {**self._head(obj), "choices": [], "usage": self._usage()})
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("Client of request %s disconnected", self.sim.request_id)
        return response


async def _send(response: web.StreamResponse, chunk: Mapping[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")


def _error(exc: BadRequest) -> web.Response:
    body = {"object": "error", "message": str(exc), "type": exc.kind, "param": None, "code": exc.status}
    return web.json_response(body, status=exc.status)


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def _max_tokens(body: Mapping[str, Any], *, chat: bool, default: int) -> int:
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest("max_tokens must be a positive integer.")
    return value


# ---------------------------------------------------------------------------------- token counting


def estimate_text_tokens(text: str) -> int:
    """``ceil(utf8_bytes / 4)``, at least 1: the common rule of thumb for BPE tokenizers."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Tokens of a completions ``prompt``: a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    raise BadRequest("prompt must be a string or a list of token ids (batched prompts are not simulated).")


def count_chat_tokens(body: Mapping[str, Any]) -> int:
    """Tokens of a chat request: message text plus a fixed template overhead per message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list.")
    total = CHAT_TOKENS_ASSISTANT_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("Every message must be an object.")
        total += CHAT_TOKENS_PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            total += estimate_text_tokens(content) if content else 0
        elif isinstance(content, list):  # content parts: count the text ones
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_text_tokens(part["text"])
    return total


def filler_token(index: int) -> str:
    """The text of generated token ``index``: deterministic filler, one word per token."""
    return " " + FILLER_WORDS[index % len(FILLER_WORDS)]


# ------------------------------------------------------------------------------------ entry point


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def build_arg_parser() -> argparse.ArgumentParser:
    """CLI flags; each defaults to its ``TANDEM_SIM_*`` environment variable, then to the built-in value."""
    d = WorkerSettings()
    p = argparse.ArgumentParser(prog="tandem-sim-worker", description="Simulated vLLM-compatible worker.")

    def opt(flag: str, env: str, typ: type, default: object, help_: str, **kw: Any) -> None:
        raw = _env(env)
        value = typ(raw) if raw is not None else default
        p.add_argument(flag, type=typ, default=value, help=f"{help_} (env {ENV_PREFIX}{env})", **kw)

    opt("--model", "MODEL", str, d.model, "model preset (tandem.perf.models)")
    opt("--accelerator", "ACCELERATOR", str, d.accelerator, "accelerator name (tandem.perf.catalog)")
    opt("--tp", "TP", int, d.tp, "tensor-parallel degree")
    opt("--role", "ROLE", str, str(d.role), "prefill, decode or mixed", choices=[r.value for r in Role])
    opt("--host", "HOST", str, d.host, "listen address")
    opt("--port", "PORT", int, d.port, "HTTP port")
    opt("--time-scale", "TIME_SCALE", float, d.time_scale, "wall seconds per model second")
    opt("--max-num-seqs", "MAX_NUM_SEQS", int, d.max_num_seqs, "max running requests")
    opt("--max-num-batched-tokens", "MAX_NUM_BATCHED_TOKENS", int, d.max_num_batched_tokens, "token budget")
    opt("--max-model-len", "MAX_MODEL_LEN", int, d.max_model_len, "context length limit")
    opt("--served-model-name", "SERVED_MODEL_NAME", str, d.served_model_name, "model name in the API")
    opt("--engine-id", "ENGINE_ID", str, d.engine_id, "engine id advertised to decode workers")
    opt("--kv-host", "KV_HOST", str, d.kv_host, "host advertised as remote_host ($POD_IP by default)")
    opt("--kv-port", "KV_PORT", int, d.kv_port, "port advertised as remote_port")
    opt("--kv-link-gbs", "KV_LINK_GBS", float, d.kv_link_gbs, "KV-transfer link bandwidth in GB/s")
    opt("--num-gpu-blocks", "NUM_GPU_BLOCKS", int, d.num_gpu_blocks, "override the KV-cache block count")
    opt("--block-size", "BLOCK_SIZE", int, d.block_size, "tokens per KV block")
    opt("--dtype", "DTYPE", str, d.dtype, "fp16, bf16 or fp8 (default: the preset's)")
    opt("--default-max-tokens", "DEFAULT_MAX_TOKENS", int, d.default_max_tokens, "max_tokens if unset")
    opt("--kv-sidecar", "KV_SIDECAR", str, d.kv_sidecar, "KV-transfer sidecar URL (pull real KV bytes)")
    opt(
        "--kv-sidecar-advertise",
        "KV_SIDECAR_ADVERTISE",
        str,
        d.kv_sidecar_advertise,
        "URL decode workers reach this worker's sidecar at (default: http://<kv host>:8200)",
    )
    p.add_argument(
        "--kv-verify",
        action="store_true",
        default=(_env("KV_VERIFY") or "").lower() in ("1", "true", "yes"),
        help=f"have the sidecar check pulled KV bytes against the prefill's (env {ENV_PREFIX}KV_VERIFY)",
    )
    opt("--log-level", "LOG_LEVEL", str, "INFO", "logging level")
    return p


def parse_settings(argv: Sequence[str] | None = None) -> tuple[WorkerSettings, str]:
    """Settings from CLI flags and ``TANDEM_SIM_*`` env; also returns the log level."""
    args = build_arg_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "log_level"}
    values["role"] = Role(values["role"])
    settings = WorkerSettings(**values)
    if settings.time_scale <= 0:
        raise SystemExit("--time-scale must be positive")
    if settings.tp < 1:
        raise SystemExit("--tp must be at least 1")
    return settings, str(args.log_level)


async def start_server(worker: SimWorker, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the worker's HTTP server; returns the runner (call ``cleanup()`` to stop) and the bound port
    (useful with ``port=0``). Handlers are cancelled when their client disconnects."""
    runner = web.AppRunner(worker.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return runner, bound


def main(argv: Sequence[str] | None = None) -> int:
    settings, level = parse_settings(argv)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = SimWorker(settings)
    logger.info("Configured simulated worker: %s", json.dumps(asdict(settings), default=str))
    web.run_app(
        worker.build_app(),
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
