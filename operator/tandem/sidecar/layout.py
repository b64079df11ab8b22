"""KV block layouts and their translation, in host memory, byte for byte.

A KV block holds ``block_size`` tokens of one layer's keys and values. Engines disagree on the
order of the axes inside a block:

- ``NHD`` (vLLM's FlashAttention backend on NVIDIA and ROCm): ``[2, block_size, kv_heads, head_dim]``
- ``HND`` (vLLM's layout for heterogeneous TP, and the Gaudi plugin's):
  ``[2, kv_heads, block_size, head_dim]``

and on the block size (16 tokens on NVIDIA/AMD, 128 on Gaudi). Translation never interprets the
numbers: elements are moved as opaque 1- or 2-byte words, so every value arrives bit-exact,
whatever its float format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Layout = Literal["NHD", "HND"]
Bytes = npt.NDArray[np.uint8]

_WORD: dict[int, type[np.unsignedinteger[Any]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@dataclass(frozen=True)
class KvGeometry:
    """The shape of one worker's KV cache for one layer (per tensor-parallel rank)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def token_bytes(self) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def request_bytes(self, num_tokens: int) -> int:
        """Bytes of a prompt's KV over all layers (what a transfer must move at least)."""
        return self.layers * num_tokens * self.token_bytes()


@dataclass(frozen=True)
class BlockFormat:
    layout: Layout
    block_size: int

    def block_bytes(self, geom: KvGeometry) -> int:
        return self.block_size * geom.token_bytes()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def _word(geom: KvGeometry) -> type[np.unsignedinteger[Any]]:
    try:
        return _WORD[geom.dtype_bytes]
    except KeyError:
        raise ValueError(f"unsupported KV element size {geom.dtype_bytes} bytes") from None


def _blocks_view(blocks: Bytes, fmt: BlockFormat, geom: KvGeometry) -> npt.NDArray[np.unsignedinteger[Any]]:
    """``blocks`` ([n, block_bytes] uint8) as [n, 2, bs, H, D] (NHD) or [n, 2, H, bs, D] (HND) words."""
    words = blocks.view(_word(geom))
    n = blocks.shape[0]
    if fmt.layout == "NHD":
        return words.reshape(n, 2, fmt.block_size, geom.kv_heads, geom.head_dim)
    return words.reshape(n, 2, geom.kv_heads, fmt.block_size, geom.head_dim)


def to_tokens(
    blocks: Bytes, fmt: BlockFormat, geom: KvGeometry, num_tokens: int
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Blocks -> the canonical ``[2, num_tokens, kv_heads, head_dim]`` words (a copy)."""
    view = _blocks_view(blocks, fmt, geom)
    if fmt.layout == "HND":
        view = view.transpose(0, 1, 3, 2, 4)  # -> [n, 2, bs, H, D]
    tokens = view.transpose(1, 0, 2, 3, 4).reshape(2, -1, geom.kv_heads, geom.head_dim)
    return np.ascontiguousarray(tokens[:, :num_tokens])


def from_tokens(
    tokens: npt.NDArray[np.unsignedinteger[Any]],
    fmt: BlockFormat,
    geom: KvGeometry,
    out: Bytes,
) -> None:
    """Write canonical tokens into ``out`` ([n, block_bytes] uint8) in ``fmt``; a trailing partial
    block keeps whatever its padding held (engines never read past the sequence length)."""
    num_tokens = tokens.shape[1]
    view = _blocks_view(out, fmt, geom)
    full, rest = divmod(num_tokens, fmt.block_size)
    bs = fmt.block_size
    if full:
        src = (
            tokens[:, : full * bs].reshape(2, full, bs, geom.kv_heads, geom.head_dim).transpose(1, 0, 2, 3, 4)
        )
        dst = view[:full] if fmt.layout == "NHD" else view[:full].transpose(0, 1, 3, 2, 4)
        np.copyto(dst, src)
    if rest:
        src = tokens[:, full * bs :]  # [2, rest, H, D]
        last = view[full]
        if fmt.layout == "NHD":
            np.copyto(last[:, :rest], src)
        else:
            np.copyto(last[:, :, :rest], src.transpose(0, 2, 1, 3))


def translate_blocks(
    src: Bytes,
    src_fmt: BlockFormat,
    dst_fmt: BlockFormat,
    geom: KvGeometry,
    num_tokens: int,
    out: Bytes,
) -> None:
    """Copy ``num_tokens`` tokens of one layer from ``src`` blocks to ``out`` blocks, re-laid out.

    ``src`` has ``src_fmt.blocks_for(num_tokens)`` rows and ``out`` ``dst_fmt.blocks_for(num_tokens)``
    rows of their formats' block bytes. Same block size: one strided copy (an axis swap for
    NHD <-> HND). Different block sizes: through the canonical token order.
    """
    if src_fmt == dst_fmt:
        np.copyto(out, src)
        return
    if src_fmt.block_size == dst_fmt.block_size:
        s = _blocks_view(src, src_fmt, geom)
        d = _blocks_view(out, dst_fmt, geom)
        np.copyto(d, s.transpose(0, 1, 3, 2, 4))  # NHD <-> HND is its own inverse
        return
    small, big = sorted((src_fmt.block_size, dst_fmt.block_size))
    if big % small:
        from_tokens(to_tokens(src, src_fmt, geom, num_tokens), dst_fmt, geom, out)
        return
    # Whole groups of `big` tokens: one strided copy between two 6-D views of the same logical
    # [group, kv, big/small, small, heads, dim] array. The tail goes through the token order.
    groups = num_tokens // big
    if groups:
        s_rows, d_rows = groups * big // src_fmt.block_size, groups * big // dst_fmt.block_size
        np.copyto(
            _grouped(out[:d_rows], dst_fmt, geom, big, small),
            _grouped(src[:s_rows], src_fmt, geom, big, small),
        )
    tail = num_tokens - groups * big
    if tail:
        s0, d0 = groups * big // src_fmt.block_size, groups * big // dst_fmt.block_size
        from_tokens(to_tokens(src[s0:], src_fmt, geom, tail), dst_fmt, geom, out[d0:])


def _grouped(blocks: Bytes, fmt: BlockFormat, geom: KvGeometry, big: int, small: int) -> npt.NDArray[Any]:
    """A view of whole blocks as [groups, 2, big // small, small, heads, dim] (token = sub * small + t)."""
    words = blocks.view(_word(geom))
    h, d, sub = geom.kv_heads, geom.head_dim, big // small
    if fmt.block_size == big:
        g = blocks.shape[0]
        if fmt.layout == "NHD":
            return words.reshape(g, 2, sub, small, h, d)
        return words.reshape(g, 2, h, sub, small, d).transpose(0, 1, 3, 4, 2, 5)
    g = blocks.shape[0] // sub
    if fmt.layout == "NHD":
        return words.reshape(g, sub, 2, small, h, d).transpose(0, 2, 1, 3, 4, 5)
    return words.reshape(g, sub, 2, h, small, d).transpose(0, 2, 1, 4, 3, 5)


def pattern_tokens(
    seed: int, layer: int, geom: KvGeometry, num_tokens: int
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """A deterministic, position-dependent KV content for tests and the simulated prefill:
    every (kv, token, head, dim) of every layer gets a distinct-looking word, so a misplaced
    token, head or layer shows up in a byte comparison."""
    word = _word(geom)
    mask = (1 << (8 * geom.dtype_bytes)) - 1
    # arithmetic in the element's own width: numpy arrays wrap around on overflow, as wanted here
    kv = np.arange(2, dtype=word).reshape(2, 1, 1, 1) * word(7919 & mask)
    tok = np.arange(num_tokens, dtype=np.uint64).astype(word).reshape(1, -1, 1, 1) * word(131 & mask)
    head = np.arange(geom.kv_heads, dtype=word).reshape(1, 1, -1, 1) * word(17)
    dim = np.arange(geom.head_dim, dtype=word).reshape(1, 1, 1, -1)
    base = word((seed * 2654435761 + layer * 40503) & mask)
    row = (kv + head + dim + base).astype(word)  # [2, 1, H, D]
    out = np.empty((2, num_tokens, geom.kv_heads, geom.head_dim), dtype=word)
    np.add(row, tok, out=out, casting="unsafe")
    return out
