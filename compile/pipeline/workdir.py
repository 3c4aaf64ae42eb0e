"""The work directory every pipeline writes its stage folders into, and the stage-row rules both backends share."""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from lmi_compile.errors import BadInput, LmiCompileError

log = logging.getLogger("lmi_compile")


def default_work_dir(model: str) -> Path:
    """lmi-compile-work/NAME in the current folder; NAME is the model's last path part, or for a path ending in
    `.` or `..` the folder it names (`..` itself would put the work dir in the current folder)."""
    name = model.rstrip("/").split("/")[-1]
    if name in ("", ".", ".."):
        name = Path(os.path.abspath(Path(model).expanduser())).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".") or "model"
    return Path("lmi-compile-work") / slug


@dataclass
class WorkDir:
    """The row of stage folders a pipeline writes; its layout shows the pipeline."""

    root: Path

    LOCK = ".lmi-compile.lock"
    STAGE_FOLDERS = ("source", "checkpoint", "engines", "split", "compiled", "logs")  # what stages replace or fill

    def __post_init__(self):
        # Absolute from the start: every stage folder derived from it is handed to subprocesses that may
        # run in another current folder (trtllm-build runs in its output folder).
        self.root = Path(os.path.abspath(Path(self.root).expanduser()))

    @contextlib.contextmanager
    def locked(self):
        """Hold the work dir for one run: refuse a file in its place, and a second run on it at the same time.

        A work dir this run created and left empty (a failure before any stage finished) is removed."""
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"{self.root}: --work-dir is a file; give a folder (it is created when missing)")
        # The outermost folder this run creates (the default's lmi-compile-work/ too), to remove if left empty.
        created = None
        for folder in (self.root, *self.root.parents):
            if folder.exists():
                break
            created = folder
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{self.root}: cannot create the work dir ({e.strerror}); choose a writable --work-dir") from None
        lock_path = self.root / self.LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise LmiCompileError(f"{self.root}: work dir is in use by process {holder}; wait for it to finish "
                                      f"or give another --work-dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            log.debug("work dir %s locked by process %d", self.root, os.getpid())
            yield self
        finally:
            if created and {p.name for p in self.root.iterdir()} <= {self.LOCK}:
                (self.root / self.LOCK).unlink(missing_ok=True)
                for folder in (self.root, *self.root.parents):
                    try:
                        folder.rmdir()  # only empty folders go
                    except OSError:
                        break
                    if folder == created:
                        break
            os.close(fd)

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
    if until not in stages:
        raise BadInput(f"--until {until!r} is not a stage; use one of {', '.join(stages)}")
    if until == stages[-1] and output is None:
        raise BadInput(f"--output is required to lay out the artifacts (or stop earlier with --until {stages[-2]})")


def overlaps(a: Path, b: Path) -> bool:
    """The two paths name one folder, or one holds the other (links resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def preflight_work(work: Path, model: str | None) -> None:
    """The work dir is ours to fill: stages replace their folders in it whole. So it may not overlap a local model
    (never modified), and an existing one that is not an lmi-compile work dir (its lock file, kept between runs,
    says so) may not hold a folder of a stage's name: `--work-dir .` in a project folder would otherwise replace a
    `checkpoint/` or `engines/` of the user's."""
    work = Path(work)
    local = Path(model).expanduser() if model else None
    if local is not None and local.is_dir() and overlaps(work, local):
        raise BadInput(f"{work}: the work dir overlaps the model folder {local.resolve()}, which is never modified; "
                       f"give --work-dir a folder outside it (or run from another folder)")
    if work.is_dir() and not (work / WorkDir.LOCK).exists():
        taken = sorted(p.name for p in work.iterdir() if p.name in WorkDir.STAGE_FOLDERS or
                       re.fullmatch(r"\.(%s)\.(partial|arriving|old-\d+)" % "|".join(WorkDir.STAGE_FOLDERS), p.name))
        if taken:
            raise BadInput(f"{work / taken[0]}: --work-dir is not an lmi-compile work dir, and its stages would "
                           f"replace this; give a folder without {', '.join(WorkDir.STAGE_FOLDERS)}")


def preflight_output(out: Path | None, *, overwrite: bool, work: Path | None = None, model: str | None = None) -> None:
    """Before any heavy stage: the work dir is ours to fill (preflight_work); the output can be written, so a bad
    --output costs seconds, not a compile; and it is apart from the work dir and a local model, since the layout
    replaces the output folder whole (with --overwrite too: that replaces what the output holds, never the model
    or the finished stages)."""
    from lmi_compile.pipeline import stages

    if work is not None:
        preflight_work(work, model)
    if out is None:
        return
    local = Path(model).expanduser() if model else None
    for other, what in ((work, "the work dir (--work-dir)"),
                        (local if local is not None and local.is_dir() else None, "the model folder")):
        if other is not None and overlaps(out, other):
            raise BadInput(f"{out}: overlaps {what} {Path(other).resolve()}; give --output a folder of its own, "
                           f"outside it and not holding it (the layout replaces --output whole)")
    stages.claim_output(out, "layout", overwrite=overwrite)  # a file where a folder of the path should be, too
    parent = stages.existing_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out}: {parent} is not writable; choose another --output")


def carry(src: Path, dst: Path) -> None:
    """A model's own small file (config, tokenizer) into an artifact: copied, never hard-linked, since the model
    may be the user's own folder, and through a shared inode an edit of the artifact would change it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def place(src: Path, dst: Path) -> None:
    """A file of our work dir into an artifact: hard-linked when possible (engines are GBs), else copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def finish_layout(staging: Path, out: Path, fp: str, job: "Job", *, stand_in: bool, what: str) -> Path:
    """Rename the laid-out tree into place, its record naming the options it was made with; say loudly when it
    holds stand-in output."""
    from lmi_compile.lmi.check import seal_layout
    from lmi_compile.pipeline import stages

    seal_layout(staging)
    stages.finish(staging, out, "layout", fp, made_with=job.made_with())
    if stand_in:
        log.warning("layout: %s holds STAND-IN %s, not a compiled model; do not deploy it", out, what)
    return out


@contextlib.contextmanager
def output_held(out: Path):
    """One layout and push (or `lmi-compile fetch`) at a time into the folder that holds `out` (a lock on that
    folder, made first if new: a folder the layout never renames, and nothing written beside the user's output):
    two runs of other work dirs with one --output would otherwise empty each other's staging, rename over each
    other's result, or publish a mix of both. The second waits, then replaces the first's output as a rerun does."""
    from lmi_compile.pipeline import stages
    from lmi_compile.pipeline.interrupts import check

    parent = Path(out).parent
    if not Path(out).exists():
        stages.folder_of(out)  # a file on the path: named as the pre-flight names it
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{out}: cannot create {parent} ({e.strerror}); choose another --output") from None
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log.info("waiting for another lmi-compile run writing into %s", parent)
                    said = True
                check()  # Ctrl-C while waiting
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def fresh_layout_staging(out: Path, *, overwrite: bool) -> Path:
    """Refuse a foreign non-empty output, then give an empty staging folder beside it."""
    from lmi_compile.pipeline import stages

    stages.claim_output(out, "layout", overwrite=overwrite)
    staging = stages.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    return staging


RUN_ONLY = {"run_only": True}  # field metadata: the option changes how a job runs, not the artifact it makes


@dataclass(kw_only=True)
class Job:
    """What every backend's job has: the model and where it comes from, where stages and output go, and
    the user's permissions (overwrite, force, remote code, longer sequences)."""

    model: str = field(metadata={"flag": "MODEL"})
    work: WorkDir = field(metadata=RUN_ONLY)
    output: Path | None = field(default=None, metadata=RUN_ONLY)
    upload: str | None = None  # shapes the artifact: serving.properties names it
    revision: str | None = None
    token: str | None = field(default=None, metadata=RUN_ONLY)
    trust_remote_code: bool = False
    allow_longer: bool = field(default=False, metadata=RUN_ONLY)  # a permission: what it permits is in the others
    overwrite: bool = field(default=False, metadata=RUN_ONLY)
    force: bool = field(default=False, metadata=RUN_ONLY)
    # False: a fetched model's weights are removed once converted/split (remote/fetch.py)
    keep_source: bool = field(default=True, metadata=RUN_ONLY)
    # `lmi-compile batch` on a cluster (batch/handover.py): publish the CPU stages' output to this S3 prefix, or
    # start from the output published there (the CPU stages ran on another node)
    handover_out: str | None = field(default=None, metadata=RUN_ONLY)
    handover_in: str | None = field(default=None, metadata=RUN_ONLY)

    def made_with(self, given: bool = False) -> dict:
        """The options that shape this job's artifact, by the flag that sets each, as JSON reads them back. The
        layout's record keeps them as the job ended (the values the backend filled in from the model included);
        the upload pre-flight compares a rerun's given ones (`given`: not those left for the backend to fill in)
        with them (remote/publish.py)."""
        return json.loads(json.dumps(_shaping(self, given), default=str))


def _shaping(obj, given: bool) -> dict:
    """{flag: value} of a job's fields (and its build options' fields) but those marked RUN_ONLY; with `given`,
    not those left to the backend: None, or the value field metadata "filled" names ("auto" dtype). Metadata
    "flag" names a flag other than the field's name, "as" an attribute standing for the value (a Target's
    release)."""
    out = {}
    for f in fields(obj):
        if f.metadata.get("run_only"):
            continue
        value = getattr(obj, f.name)
        if "as" in f.metadata:
            value = getattr(value, f.metadata["as"])
        if is_dataclass(value):
            out.update(_shaping(value, given))
        elif not given or (value is not None and value != f.metadata.get("filled", None)):
            out[f.metadata.get("flag", "--" + f.name.replace("_", "-"))] = value
    return out
