"""Tensor-parallel split rules, by layer kind (not by model): replicate, column, row, fused QKV, vocab, the
two MoE expert kinds, and the FP8 kinds (a fused QKV requantized to one scale, per-tensor and per-channel scales,
per-channel FP8 weights dequantized into the model dtype).

Each rule kind is one class that answers both questions for one rank, side by side: the output shape
(from source shapes alone, so rank files can be planned before any data is read) and the output's
bytes, in order, as pieces: byte ranges of source files (copied in the kernel), zero padding, or small
tensors (row-parallel slices, one row block at a time). No piece is larger than a row block unless it
is a file range. The layout table names a rule per tensor; RULES maps that name to its class.
"""

from dataclasses import dataclass

import torch

from lmi_compile.converters.tensor_reader import FileRange, TensorReader, Zeros
from lmi_compile.model.dtypes import FP8, FP8_MAX, itemsize


@dataclass(frozen=True)
class RankContext:
    tp: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    num_experts: int = 0
    moe_tp: int = 1
    moe_ep: int = 1

    @property
    def moe_tp_rank(self) -> int:
        return self.rank // self.moe_ep  # TRT-LLM's Mapping: moe_tp_rank = tp_rank // moe_ep_size

    @property
    def moe_ep_rank(self) -> int:
        return self.rank % self.moe_ep  # moe_ep_rank = tp_rank % moe_ep_size

    def experts(self) -> range:
        """The experts this rank holds: a contiguous block of num_experts / moe_ep (Mapping.ep_experts)."""
        return range(*_part(self.num_experts, self.moe_ep, self.moe_ep_rank))


def padded(n: int, tp: int) -> int:
    return -(-n // tp) * tp


def _part(n: int, parts: int, index: int) -> tuple[int, int]:
    size = n // parts
    return index * size, (index + 1) * size


def kv_heads_for_rank(ctx: RankContext) -> list[int]:
    """Source kv heads a rank holds; with fewer kv heads than ranks each is repeated (TRT-LLM's rule)."""
    if ctx.num_kv_heads >= ctx.tp:
        per = ctx.num_kv_heads // ctx.tp
        return list(range(ctx.rank * per, (ctx.rank + 1) * per))
    dups = ctx.tp // ctx.num_kv_heads
    return [ctx.rank // dups]


def whole(reader: TensorReader, name: str):
    """A tensor's bytes as one contiguous range."""
    info = reader.info(name)
    return reader.row_range(name, 0, info.shape[0] if info.shape else 1)


def column_slice(reader: TensorReader, name: str, c0: int, c1: int):
    """Columns [c0, c1) of a 2-D tensor, one row block at a time (the only pieces that pass through memory)."""
    rows, cols = reader.info(name).shape
    if (c0, c1) == (0, cols):  # every column: the whole tensor is one contiguous range
        yield whole(reader, name)
        return
    per_row = max(1, reader.row_elems(name) * itemsize(reader.info(name).dtype))
    block = max(1, reader.block_bytes // per_row)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        yield reader.rows(name, r0, r1)[:, c0:c1].contiguous()


class Replicate:
    """Every rank holds the whole tensor (norms, an unsplit embedding)."""

    def shape(self, src: list[tuple], ctx: RankContext) -> tuple:
        return tuple(src[0])

    def pieces(self, reader: TensorReader, names: list[str], ctx: RankContext):
        return [whole(reader, names[0])]


class Column:
    """Split along dim 0 (output features): each rank's rows are one contiguous range."""

    def shape(self, src, ctx):
        return (src[0][0] // ctx.tp, *src[0][1:])

    def pieces(self, reader, names, ctx):
        return [reader.row_range(names[0], *_part(reader.info(names[0]).shape[0], ctx.tp, ctx.rank))]

    def spans(self, reader, names, ctx):
        """(source, first row, end row, (first column, end column) or None) of the rank's slice, in order."""
        return [(names[0], *_part(reader.info(names[0]).shape[0], ctx.tp, ctx.rank), None)]


class Row:
    """Split along dim 1 (input features): rank outputs are partial sums, all-reduced at run time."""

    def shape(self, src, ctx):
        return (src[0][0], src[0][1] // ctx.tp)

    def pieces(self, reader, names, ctx):
        return column_slice(reader, names[0], *_part(reader.info(names[0]).shape[1], ctx.tp, ctx.rank))

    def spans(self, reader, names, ctx):
        return [(names[0], 0, reader.info(names[0]).shape[0],
                 _part(reader.info(names[0]).shape[1], ctx.tp, ctx.rank))]


class Vocab:
    """Split along dim 0 after padding the rows with zeros to a multiple of tp (TRT-LLM's lm_head)."""

    def shape(self, src, ctx):
        return (padded(src[0][0], ctx.tp) // ctx.tp, *src[0][1:])

    def pieces(self, reader, names, ctx):
        name = names[0]
        vocab = reader.info(name).shape[0]
        part = padded(vocab, ctx.tp) // ctx.tp
        r0, r1 = ctx.rank * part, (ctx.rank + 1) * part
        if min(r1, vocab) > r0:
            yield reader.row_range(name, r0, min(r1, vocab))
        missing = r1 - max(r0, min(r1, vocab))
        if missing:
            yield Zeros(missing * reader.row_elems(name))


class FusedQKV:
    """q, k, v each split by heads, the rank's slices concatenated; kv heads repeated when fewer than tp."""

    def shape(self, src, ctx):
        q_rows = (ctx.num_heads // ctx.tp) * ctx.head_dim
        kv_rows = len(kv_heads_for_rank(ctx)) * ctx.head_dim
        return (q_rows + 2 * kv_rows, *src[0][1:])

    def pieces(self, reader, names, ctx):
        q, k, v = names
        hd = ctx.head_dim
        q0, q1 = _part(ctx.num_heads, ctx.tp, ctx.rank)
        yield reader.row_range(q, q0 * hd, q1 * hd)
        heads = kv_heads_for_rank(ctx)
        for src in (k, v):
            # consecutive heads are one contiguous range
            yield reader.row_range(src, heads[0] * hd, (heads[-1] + 1) * hd)

    def spans(self, reader, names, ctx):
        q, k, v = names
        hd, heads = ctx.head_dim, kv_heads_for_rank(ctx)
        q0, q1 = _part(ctx.num_heads, ctx.tp, ctx.rank)
        return [(q, q0 * hd, q1 * hd, None)] + [(n, heads[0] * hd, (heads[-1] + 1) * hd, None) for n in (k, v)]


class ExpertColumn:
    """Per expert, its sources (e.g. [w3, w1]) each split along dim 0 over moe_tp and concatenated; the rank's
    experts stacked along a new dim 0: [experts / moe_ep, sources * rows / moe_tp, cols]. Sources are listed
    expert by expert. Every piece is a contiguous range of one source: nothing is stacked in memory."""

    def shape(self, src, ctx):
        per = len(src) // ctx.num_experts
        return (ctx.num_experts // ctx.moe_ep, per * (src[0][0] // ctx.moe_tp), *src[0][1:])

    def pieces(self, reader, names, ctx):
        per = len(names) // ctx.num_experts
        for e in ctx.experts():
            for name in names[e * per:(e + 1) * per]:
                yield reader.row_range(name, *_part(reader.info(name).shape[0], ctx.moe_tp, ctx.moe_tp_rank))


class ExpertRow:
    """Per expert, one source split along dim 1 over moe_tp; the rank's experts stacked along a new dim 0:
    [experts / moe_ep, rows, cols / moe_tp]."""

    def shape(self, src, ctx):
        return (ctx.num_experts // ctx.moe_ep, src[0][0], src[0][1] // ctx.moe_tp)

    def pieces(self, reader, names, ctx):
        for e in ctx.experts():
            yield from column_slice(reader, names[e], *_part(reader.info(names[e]).shape[1], ctx.moe_tp,
                                                             ctx.moe_tp_rank))


def scalar(reader: TensorReader, name: str) -> float:
    """A per-tensor scale (stored as shape [] or [1]) as a Python float."""
    return float(reader.full(name).float().reshape(-1)[0])


def requantized(piece, reader: TensorReader, ratio: float):
    """FP8 values q (a FileRange or tensor) re-expressed for a scale 1/ratio times larger: q * ratio, rounded to
    FP8 (round to nearest even, as torch's cast does), one block at a time."""
    if not isinstance(piece, FileRange):
        yield _requant(piece, ratio)
        return
    per = max(1, reader.block_bytes // 4)  # sized by the float32 values a block becomes
    for first in range(0, piece.numel, per):
        n = min(per, piece.numel - first)
        yield _requant(reader.read(FileRange(piece.path, piece.offset + first * itemsize(piece.dtype), n, piece.dtype)),
                      ratio)


def _requant(q: torch.Tensor, ratio: float) -> torch.Tensor:
    return q.float().mul_(ratio).clamp_(-FP8_MAX, FP8_MAX).to(getattr(torch, FP8))


class FusedQKVFP8(FusedQKV):
    """FP8 q, k, v (names: the three weights, then their three weight scales) fused into one FP8 weight with one
    scale. TensorRT-LLM 1.x loads Hub FP8 checkpoints this way (issue #12's reading of models/llama/convert.py and
    quantization/layers.py): each of q, k, v is dequantized with its own scale and quantized again with the largest,
    which keeps every value in range; a tensor whose scale is the largest keeps its bytes exactly. The fused weight's
    weights_scaling_factor is that largest scale (rule scale_max)."""

    def shape(self, src, ctx):
        return super().shape(src[:3], ctx)

    def pieces(self, reader, names, ctx):
        scales = [scalar(reader, n) for n in names[3:]]
        top = max(scales)
        for piece, s in zip(super().pieces(reader, names[:3], ctx), scales):
            if s == top:
                yield piece
            else:
                yield from requantized(piece, reader, s / top)


class ExpertColumnFP8(ExpertColumn):
    """FP8 experts' [w3; w1] (names: the weights expert by expert, then their per-tensor weight scales in the same
    order) with one scale per expert, as TensorRT-LLM's MoE holds them (layers/moe.py MOEWeightWrapper:
    weights_scaling_factor (experts_per_node, 1)): the source with the expert's largest scale keeps its bytes, the
    other is dequantized and quantized again to that scale (as FusedQKVFP8 does for q, k, v)."""

    def shape(self, src, ctx):
        return super().shape(src[:len(src) // 2], ctx)

    def pieces(self, reader, names, ctx):
        half = len(names) // 2
        weights, scales = names[:half], [scalar(reader, n) for n in names[half:]]
        per = half // ctx.num_experts
        for e in ctx.experts():
            top = max(scales[e * per:(e + 1) * per])
            for name, s in zip(weights[e * per:(e + 1) * per], scales[e * per:(e + 1) * per]):
                piece = reader.row_range(name, *_part(reader.info(name).shape[0], ctx.moe_tp, ctx.moe_tp_rank))
                if s == top:
                    yield piece
                else:
                    yield from requantized(piece, reader, s / top)


class ExpertScaleMax:
    """The rank's experts' weight scales, float32 (experts / moe_ep, 1): per expert the largest of its sources' (names
    listed expert by expert)."""

    def shape(self, src, ctx):
        return (ctx.num_experts // ctx.moe_ep, 1)

    def pieces(self, reader, names, ctx):
        per = len(names) // ctx.num_experts
        return [torch.tensor([[max(scalar(reader, n) for n in names[e * per:(e + 1) * per])] for e in ctx.experts()],
                             dtype=torch.float32)]


class ScaleMax:
    """A per-tensor scale on every rank, float32 shape (1,): the largest of its sources. One source: that scale
    (a per-tensor scale applies to every slice of its tensor). The fused qkv takes the largest weight scale (its
    weight is requantized to it) and the largest input scale (q, k and v read the same input, so exporters store
    one value three times). No sources: 1.0."""

    def shape(self, src, ctx):
        return (1,)

    def pieces(self, reader, names, ctx):
        return [torch.tensor([max((scalar(reader, n) for n in names), default=1.0)], dtype=torch.float32)]


class ScaleOne(ScaleMax):
    """1.0 whatever the sources hold: what TensorRT-LLM 0.9-0.12 use for an FP8 KV cache (preprocess_weights
    overwrites every kv_cache_scaling_factor with 1.0 at build), so the stored k/v scales are accounted for but
    not used."""

    def pieces(self, reader, names, ctx):
        return [torch.ones(1, dtype=torch.float32)]


class Dequantized:
    """Per-channel FP8 weights (names: the weights, then their [out, 1] scales) written in the model dtype, as the
    rank's slice of the base rule (column, row or fused qkv): each row q * its scale, computed in float32 one row
    block at a time, then cast once by the writer. For the Linears TensorRT-LLM keeps unquantized under
    FP8_PER_CHANNEL_PER_TOKEN (attention, the first and last layers' MLP)."""

    def __init__(self, base):
        self.base = base

    def shape(self, src, ctx):
        return self.base.shape(src[:len(src) // 2], ctx)

    def pieces(self, reader, names, ctx):
        half = len(names) // 2
        scales = dict(zip(names[:half], names[half:]))
        for name, r0, r1, cols in self.base.spans(reader, names[:half], ctx):
            scale = reader.full(scales[name]).float().reshape(-1).clone()  # the reader's scratch is reused below
            # a block is sized by its float32 values (4x the FP8 bytes), so a worker holds about one block_bytes
            block = max(1, reader.block_bytes // (reader.row_elems(name) * 4))
            for a in range(r0, r1, block):
                b = min(r1, a + block)
                rows = reader.rows(name, a, b)
                if cols:
                    rows = rows[:, cols[0]:cols[1]]
                yield rows.float().mul_(scale[a:b, None])


class ChannelScaleQKV(FusedQKV):
    """The per_channel_scale of an FP8 per-channel fused qkv: the rank's rows of the q, k and v scales ([out, 1] or
    [out]) in the weight's order, as float32 (out_features,)."""

    def shape(self, src, ctx):
        return super().shape(src, ctx)[:1]


class ChannelScale:
    """A per-channel scale as TensorRT-LLM's Fp8RowwiseLinear holds it: float32 (out_features,), the rank's rows of a
    column-parallel Linear (split) or every row for a row-parallel one, whose output rows are not split."""

    def __init__(self, split: bool):
        self.split = split

    def shape(self, src, ctx):
        rows = src[0][0]
        return (rows // ctx.tp if self.split else rows,)

    def pieces(self, reader, names, ctx):
        rows = reader.info(names[0]).shape[0]
        r0, r1 = _part(rows, ctx.tp, ctx.rank) if self.split else (0, rows)
        return [reader.full(names[0]).float().reshape(-1)[r0:r1].clone()]


RULES = {"replicate": Replicate(), "column": Column(), "row": Row(), "vocab": Vocab(), "fused_qkv": FusedQKV(),
         "expert_column": ExpertColumn(), "expert_row": ExpertRow(), "fused_qkv_fp8": FusedQKVFP8(),
         "scale_max": ScaleMax(), "scale_one": ScaleOne(), "dequant_column": Dequantized(Column()),
         "dequant_row": Dequantized(Row()), "dequant_fused_qkv": Dequantized(FusedQKV()),
         "channel_scale_column": ChannelScale(split=True), "channel_scale_row": ChannelScale(split=False),
         "channel_scale_fused_qkv": ChannelScaleQKV(),
         "expert_column_fp8": ExpertColumnFP8(), "expert_scale_max": ExpertScaleMax()}


def rule_for(name: str, ctx: RankContext):
    """The rule class for a table rule name. The embedding is replicated, or split like the vocab (dim 0)
    or like a row-parallel weight (dim 1), as the options say."""
    if name == "embedding":
        name = "replicate" if not ctx.parallel_embedding else "vocab" if ctx.embedding_sharding_dim == 0 else "row"
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown split rule {name!r}") from None


def shape_for(rule: str, src_shapes: list[tuple], ctx: RankContext) -> tuple:
    """One rank's output shape, from the source shapes alone."""
    return rule_for(rule, ctx).shape(src_shapes, ctx)


def pieces(rule: str, reader: TensorReader, names: list[str], ctx: RankContext):
    """The bytes of one rank's output tensor, in order, as FileRange / Zeros / tensor pieces."""
    return rule_for(rule, ctx).pieces(reader, names, ctx)
