"""The work directory every pipeline writes its stage folders into, and the stage-row rules both backends share."""

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lmi_compile")


def default_work_dir(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1] or "model")
    return Path("lmi-compile-work") / slug


@dataclass
class WorkDir:
    """The row of stage folders a pipeline writes; its layout shows the pipeline."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def compiled(self) -> Path:
        return self.root / "compiled"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def check_until(until: str, stages: tuple[str, ...], output) -> None:
    """--until names one of the backend's stages; the last stage (layout) needs --output."""
    from lmi_compile.errors import BadInput

    if until not in stages:
        raise BadInput(f"--until {until!r} is not a stage; use one of {', '.join(stages)}")
    if until == stages[-1] and output is None:
        raise BadInput(f"--output is required to lay out the artifacts (or stop earlier with --until {stages[-2]})")


def place(src: Path, dst: Path) -> None:
    """Hard-link when possible (engines are GBs), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def finish_layout(staging: Path, out: Path, fp: str, *, stand_in: bool, what: str) -> Path:
    """Rename the laid-out tree into place; say loudly when it holds stand-in output."""
    from lmi_compile.pipeline import stages

    stages.finish(staging, out, "layout", fp)
    if stand_in:
        log.warning("layout: %s holds STAND-IN %s, not a compiled model; do not deploy it", out, what)
    return out


def fresh_layout_staging(out: Path, *, overwrite: bool) -> Path:
    """Refuse a foreign non-empty output, then give an empty staging folder beside it."""
    from lmi_compile.pipeline import stages

    stages.claim_output(out, "layout", overwrite=overwrite)
    staging = stages.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    return staging
