"""Tensor-parallel split rules, by layer kind (not by model): replicate, column, row, fused QKV, vocab.

Each rule answers two questions for one rank: the output shape (from source shapes alone, so rank
files can be planned before any data is read) and the output's bytes, in order, as pieces: byte
ranges of source files (copied in the kernel), zero padding, or small tensors (row-parallel slices,
one row block at a time). No piece is larger than a row block unless it is a file range.
"""

from dataclasses import dataclass

import torch

from lmi_compile.converters.tensor_reader import TensorReader, Zeros


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


def _row_split(reader: TensorReader, name: str, ctx: RankContext):
    rows, cols = reader.info(name).shape
    c0, c1 = _even(cols, ctx)
    per_row = max(1, reader.row_elems(name) * torch.empty((), dtype=getattr(torch, reader.info(name).dtype))
                  .element_size())
    block = max(1, reader.block_bytes // per_row)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        yield reader.rows(name, r0, r1)[:, c0:c1].contiguous()


def _vocab_split(reader: TensorReader, name: str, ctx: RankContext):
    vocab = reader.info(name).shape[0]
    part = padded(vocab, ctx.tp) // ctx.tp
    r0, r1 = ctx.rank * part, (ctx.rank + 1) * part
    if min(r1, vocab) > r0:
        yield reader.row_range(name, r0, min(r1, vocab))
    missing = r1 - max(r0, min(r1, vocab))
    if missing:
        yield Zeros(missing * reader.row_elems(name))  # TRT-LLM pads the vocab with zero rows


def _fused_qkv(reader: TensorReader, names: list[str], ctx: RankContext):
    q, k, v = names
    hd = ctx.head_dim
    q0, q1 = _even(ctx.num_heads, ctx)
    yield reader.row_range(q, q0 * hd, q1 * hd)
    heads = kv_heads_for_rank(ctx)
    for src in (k, v):
        # consecutive heads are one contiguous range
        yield reader.row_range(src, heads[0] * hd, (heads[-1] + 1) * hd)


def pieces(rule: str, reader: TensorReader, names: list[str], ctx: RankContext):
    """The bytes of one rank's output tensor, in order, as FileRange / Zeros / tensor pieces."""
    rule = effective_rule(rule, ctx)
    if rule == "replicate":
        info = reader.info(names[0])
        return [reader.row_range(names[0], 0, info.shape[0] if info.shape else 1)]
    if rule == "column":
        return [reader.row_range(names[0], *_even(reader.info(names[0]).shape[0], ctx))]
    if rule == "row" and ctx.tp > 1:
        return _row_split(reader, names[0], ctx)
    if rule == "row":  # one rank holds every column: the whole tensor is one contiguous range
        return [reader.row_range(names[0], 0, reader.info(names[0]).shape[0])]
    if rule == "vocab":
        return _vocab_split(reader, names[0], ctx)
    if rule == "fused_qkv":
        return _fused_qkv(reader, names, ctx)
    raise ValueError(f"unknown split rule {rule!r}")
