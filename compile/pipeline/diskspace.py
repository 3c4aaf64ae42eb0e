"""Disk pre-flight: a stage that cannot fit refuses to start, naming the numbers."""

import shutil
from pathlib import Path

from lmi_compile.errors import LmiCompileError
from lmi_compile.pipeline.stages import existing_parent

# Filesystem metadata, logs and rounding: keep a little headroom.
MARGIN_BYTES = 64 * 1024 * 1024


def ensure_room(path: Path, needed: int, stage: str) -> None:
    free = shutil.disk_usage(existing_parent(path)).free
    if needed + MARGIN_BYTES > free:
        raise LmiCompileError(f"{path}: the {stage} stage needs about {needed / 2**30:.2f} GiB but the filesystem "
                              f"has {free / 2**30:.2f} GiB free; free space or choose another --work-dir/--output")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
