"""HuggingFace checkpoint -> transformers-neuronx split weights (the `pytorch_model.bin/` directory).

Format (transformers_neuronx.module.save_split): key_to_filename.json maps each state-dict key, in the
model's state-dict order, to "p{idx}.{sanitized key}", and each file is one torch.save()d tensor.
Tied weights get a file of their own (lm_head.weight is written even when tied). One tensor is in
memory at a time; each file is written to a temporary name and renamed.
"""

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lmi_compile.model.architectures import Architecture
from lmi_compile.model.checkpoint import Checkpoint
from lmi_compile.errors import BadInput, LmiCompileError
from lmi_compile.pipeline.interrupts import check
from lmi_compile.pipeline.progress import bytes_bar

from lmi_compile.converters.tensor_reader import ByteBudget, TensorReader
from lmi_compile.model.dtypes import AMP_DTYPES

SPLIT_DIR = "pytorch_model.bin"
KEY_TO_FILENAME = "key_to_filename.json"


def sanitize_file_name(name: str) -> str:
    """The same rule transformers-neuronx applies: spaces to _, keep letters, digits, '-', '_', '.'."""
    s = re.sub(r"(?u)[^-\w.]", "", name.strip().replace(" ", "_"))
    if s in {"", ".", ".."}:
        raise BadInput(f"tensor name {name!r} cannot be turned into a file name")
    return s


def split_plan(arch: Architecture, ck: Checkpoint) -> list[tuple[str, str]]:
    """(key to write, source tensor) in state-dict order, from the architecture's neuron_order table.

    State-dict order is module order: what precedes the layers, each layer whole, what follows. Within a
    layer, a run of names with {e} is one expert module's parameters, repeated for every expert in turn.
    """
    order = arch.layout["neuron_order"]
    layer = [t for t in order if "{i}" in t]
    first = order.index(layer[0])
    keys = list(order[:first])
    for i in range(arch.dims.num_layers):
        run: list[str] = []
        for t in layer + [""]:
            if "{e}" in t:
                run.append(t)
                continue
            keys += [r.format(i=i, e=e) for e in range(arch.dims.num_experts) for r in run]
            run = []
            if t:
                keys.append(t.format(i=i))
    keys += [t for t in order[first:] if "{i}" not in t]
    tied = arch.tied_sources()
    plan = []
    for key in keys:
        if key in ck:
            plan.append((key, key))
        elif key in tied:
            plan.append((key, tied[key]))  # tied weights get a file of their own
        elif not key.endswith(".bias"):  # biases are the layout's optional entries (families that have them)
            raise BadInput(f"{ck.root}: tensor {key!r} is missing from the checkpoint ({arch.name} needs it); the "
                           f"checkpoint is incomplete")
    shapes = arch.source_shapes()
    for _, src in plan:
        if src in shapes:
            ck.require_shape(src, shapes[src])
    extra = set(ck.tensors) - {src for _, src in plan} - arch.ignored_sources()
    if extra:
        raise BadInput(f"{ck.root}: tensors {sorted(extra)[:3]} are not part of {arch.name}'s layout; "
                       f"the checkpoint does not match its config.json")
    return plan


def write_split(arch: Architecture, ck: Checkpoint, out: Path, amp: str | None, workers: int = 4,
                feed=None) -> dict:
    """Write out/pytorch_model.bin/ (files kept when already complete from an interrupted run). `feed`: a model
    still downloading (remote/streaming.py Feed), as for converters/trtllm_checkpoint.py write_ranks.

    Up to `workers` tensors are written at once, but the bytes in flight never exceed the largest
    tensor (or 512 MiB, when larger): the embedding and lm_head, 1 GB each for Llama 3, never overlap.
    """
    target = AMP_DTYPES[amp] if amp else None
    plan = split_plan(arch, ck)
    split = out / SPLIT_DIR
    split.mkdir(parents=True, exist_ok=True)
    mapping = {key: f"p{idx}.{sanitize_file_name(key)}" for idx, (key, _) in enumerate(plan)}
    budget = ByteBudget(max(max(ck.tensors[src].nbytes for _, src in plan), 512 * 1024 * 1024))
    readers = threading.local()
    opened: list[TensorReader] = []
    bar = bytes_bar(sum(ck.tensors[src].nbytes for _, src in plan), "split weights")

    def one(key: str, src: str) -> None:
        check()
        path = split / mapping[key]
        if path.exists():
            if feed:
                feed.done((src,))
            bar.update(ck.tensors[src].nbytes)
            return
        if feed:
            feed.ready((src,))
        with budget.hold(ck.tensors[src].nbytes * (2 if target else 1)):  # a cast holds source and result
            reader = getattr(readers, "r", None)
            if reader is None:
                reader = readers.r = TensorReader(ck)
                opened.append(reader)
            # own exact-size storage: torch.save writes the whole storage behind a tensor
            t = reader.read_owned(src)
            if target and str(t.dtype) != f"torch.{target}":
                t = t.to(getattr(torch, target))
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as f:  # our file: a full disk is an OSError (torch's own says "unexpected pos")
                    torch.save(t, f)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                # torch's zip writer turns the OSError of a write into "unexpected pos" as it closes: find it
                cause = e if isinstance(e, Exception) else None
                while cause is not None and not isinstance(cause, OSError):
                    cause = cause.__context__
                if cause is None:
                    raise
                raise LmiCompileError(f"{path}: cannot write ({cause.strerror or cause}); free disk space or choose "
                                      f"another --work-dir, then rerun (finished files are kept)") from None
            os.replace(tmp, path)
            del t
        if feed:
            feed.done((src,))
        bar.update(ck.tensors[src].nbytes)

    if feed:
        feed.plan([(src,) for _, src in plan])
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for f in [pool.submit(one, key, src) for key, src in plan]:
                f.result()
    finally:
        bar.close()
        for r in opened:
            r.close()
    (split / KEY_TO_FILENAME).write_text(json.dumps(mapping, indent=2))
    return mapping
