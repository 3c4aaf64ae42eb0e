"""Tensor-parallel split rules, by layer kind (not by model): replicate, column, row, fused QKV, vocab.

Each rule answers two questions for one rank: the output shape (from source shapes alone, so rank
files can be planned before any data is read) and the output tensor (reading only what that rank
needs where the layout allows: column slices are contiguous rows on disk).
"""

from dataclasses import dataclass

import torch

from .tensor_reader import TensorReader

# Row-split tensors are read in row blocks of about this many bytes, so a rank holds its slice plus one block.
ROW_BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RankContext:
    tp: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0


def padded(n: int, tp: int) -> int:
    return -(-n // tp) * tp


def _even(n: int, ctx: RankContext) -> tuple[int, int]:
    part = n // ctx.tp
    return ctx.rank * part, (ctx.rank + 1) * part


def kv_heads_for_rank(ctx: RankContext) -> list[int]:
    """Source kv heads a rank holds; with fewer kv heads than ranks each is repeated (TRT-LLM's rule)."""
    if ctx.num_kv_heads >= ctx.tp:
        per = ctx.num_kv_heads // ctx.tp
        return list(range(ctx.rank * per, (ctx.rank + 1) * per))
    dups = ctx.tp // ctx.num_kv_heads
    return [ctx.rank // dups]


def effective_rule(rule: str, ctx: RankContext) -> str:
    """The embedding is replicated, or split like the vocab (dim 0) or like a row-parallel weight (dim 1)."""
    if rule != "embedding":
        return rule
    if not ctx.parallel_embedding:
        return "replicate"
    return "vocab" if ctx.embedding_sharding_dim == 0 else "row"


# -- shapes ---------------------------------------------------------------------------------------

def shape_for(rule: str, src_shapes: list[tuple], ctx: RankContext) -> tuple:
    s = src_shapes[0]
    rule = effective_rule(rule, ctx)
    if rule == "replicate":
        return tuple(s)
    if rule == "column":
        return (s[0] // ctx.tp, *s[1:])
    if rule == "row":
        return (s[0], s[1] // ctx.tp)
    if rule == "vocab":
        return (padded(s[0], ctx.tp) // ctx.tp, *s[1:])
    if rule == "fused_qkv":
        q_rows = (ctx.num_heads // ctx.tp) * ctx.head_dim
        kv_rows = len(kv_heads_for_rank(ctx)) * ctx.head_dim
        return (q_rows + 2 * kv_rows, *s[1:])
    raise ValueError(f"unknown split rule {rule!r}")


# -- data -----------------------------------------------------------------------------------------

def _row_split(reader: TensorReader, name: str, ctx: RankContext) -> torch.Tensor:
    info = reader.info(name)
    rows, cols = info.shape
    c0, c1 = _even(cols, ctx)
    out = torch.empty((rows, c1 - c0), dtype=getattr(torch, info.dtype))
    block = max(1, ROW_BLOCK_BYTES // max(1, info.nbytes // max(rows, 1)))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        out[r0:r1] = reader.rows(name, r0, r1)[:, c0:c1]
    return out


def _vocab_split(reader: TensorReader, name: str, ctx: RankContext) -> torch.Tensor:
    info = reader.info(name)
    vocab = info.shape[0]
    part = padded(vocab, ctx.tp) // ctx.tp
    r0, r1 = ctx.rank * part, (ctx.rank + 1) * part
    got = reader.rows(name, min(r0, vocab), min(r1, vocab))
    if got.shape[0] == part:
        return got
    # Padding rows are zeros, as TRT-LLM's converter writes them.
    out = torch.zeros((part, *info.shape[1:]), dtype=got.dtype)
    out[: got.shape[0]] = got
    return out


def _fused_qkv(reader: TensorReader, names: list[str], ctx: RankContext) -> torch.Tensor:
    q, k, v = names
    hd = ctx.head_dim
    q0, q1 = _even(ctx.num_heads, ctx)
    parts = [reader.rows(q, q0 * hd, q1 * hd)]
    heads = kv_heads_for_rank(ctx)
    for src in (k, v):
        parts += [reader.rows(src, h * hd, (h + 1) * hd) for h in heads]
    return torch.cat(parts, dim=0)


def produce(rule: str, reader: TensorReader, names: list[str], ctx: RankContext) -> torch.Tensor:
    """The tensor this rank holds for one output, read from its sources."""
    rule = effective_rule(rule, ctx)
    if rule == "replicate":
        return reader.full(names[0])
    if rule == "column":
        n = reader.info(names[0]).shape[0]
        return reader.rows(names[0], *_even(n, ctx))
    if rule == "row":
        return _row_split(reader, names[0], ctx)
    if rule == "vocab":
        return _vocab_split(reader, names[0], ctx)
    if rule == "fused_qkv":
        return _fused_qkv(reader, names, ctx)
    raise ValueError(f"unknown split rule {rule!r}")
