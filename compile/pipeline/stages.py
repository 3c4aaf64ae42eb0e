"""Stage bookkeeping: each stage writes a folder next to its final name, records what it did, and renames.

A folder without its record is never taken as finished, so a crash at any moment leaves nothing that
looks complete; a rerun with the same fingerprint skips the stage.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.errors import BadInput
from lmi_compile.pipeline import testhooks

log = logging.getLogger("lmi_compile")

STAGE_RECORD = ".lmi-compile-stage.json"


def fingerprint(**facts) -> str:
    """A stable digest of a stage's inputs and options (never include secrets)."""
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def read_record(folder: Path, name: str = STAGE_RECORD) -> dict | None:
    try:
        data = json.loads((Path(folder) / name).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def is_done(folder: Path, stage: str, fp: str) -> bool:
    rec = read_record(folder)
    done = bool(rec) and rec.get("stage") == stage and rec.get("fingerprint") == fp
    log.debug("%s: %s %s (fingerprint %s, recorded %s)", stage, folder, "is up to date" if done else "must run", fp,
              (rec or {}).get("fingerprint"))
    return done


def write_json_atomic(path: Path, data, *, indent: int | None = 2, durable: bool = True) -> None:
    """Write JSON to a temporary name, fsync (when `durable`), rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=False)
        f.write("\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def existing_parent(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return p


def folder_of(path: Path) -> Path:
    """The nearest existing folder on `path`; a file there (where a folder of the path should be) is bad input."""
    parent = existing_parent(path)
    if not parent.is_dir():
        raise BadInput(f"{path}: {parent} is a file, not a folder; choose another path")
    return parent


def staging_dir(final: Path) -> Path:
    """Where a stage builds its folder before the rename; stable so an interrupted run can resume."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


PARTIAL_RECORD = ".lmi-compile-partial.json"


def open_staging(final: Path, fp: str, *, durable: bool = True) -> Path:
    """The staging folder for `final`, emptied first when it holds work for other inputs or options,
    so an interrupted run resumes and a changed run starts clean (durable: as for finish)."""
    staging = staging_dir(final)
    # the partial record, or the stage's own when a run ended between recording the stage and its rename
    same = any((read_record(staging, record) or {}).get("fingerprint") == fp
               for record in (PARTIAL_RECORD, STAGE_RECORD))
    log.debug("staging %s: %s", staging, "resuming" if same else "starting clean")
    if not same:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_json_atomic(staging / PARTIAL_RECORD, {"fingerprint": fp}, durable=durable)
    else:
        # A run killed with SIGKILL leaves its temporaries; finished files were renamed and are kept.
        for tmp in staging.rglob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
    return staging


def claim_output(final: Path, stage: str, *, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder that is not this tool's output of the same stage."""
    final = Path(final)
    if final.is_symlink():  # the stage's rename would replace the link, not fill the folder it names
        raise BadInput(f"{final}: is a symbolic link (to {os.readlink(final)}); give the folder's own path instead")
    if not final.exists():
        folder_of(final)
        return
    if not final.is_dir():
        raise BadInput(f"{final}: exists and is not a folder; choose another path or remove it")
    if not any(final.iterdir()):
        return
    rec = read_record(final)
    if overwrite:
        return
    if not rec or rec.get("stage") != stage:
        raise BadInput(f"{final}: folder is not empty and is not an lmi-compile {stage} output; "
                       f"choose an empty path or pass --overwrite to replace it")
    # An earlier run of ours: replacing it is what a rerun means, unless the user has since put or edited a file in it.
    theirs = not_written_here(final, rec)
    if theirs:
        raise BadInput(f"{final / theirs}: added or changed since lmi-compile wrote {final} (a rerun replaces that "
                       f"folder); move the file out of it, or pass --overwrite to replace the folder")


def file_facts(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of the files under folder, the stage record aside."""
    facts = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STAGE_RECORD:
            st = p.stat()
            facts[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return facts


def not_written_here(folder: Path, rec: dict) -> str | None:
    """The first entry under `folder` that its stage record does not list as written (or that changed since), or
    None: a file, or anything a stage never writes (a link, a folder holding no file it wrote, a FIFO). A record
    without the list (lmi-compile 0.1.0 before it kept one) cannot tell: its record file answers."""
    files = rec.get("files")
    if not isinstance(files, dict):
        return STAGE_RECORD
    for rel, fact in file_facts(folder).items():
        if files.get(rel) != fact:
            return rel
    holders = {parent.as_posix() for rel in files for parent in Path(rel).parents}
    for top, dirs, names in os.walk(folder):  # never into linked folders
        for name in sorted(dirs + names):
            p = Path(top, name)
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or (p.is_dir() and rel not in holders) or not (p.is_dir() or p.is_file()):
                return rel
    return None


def finish(staging: Path, final: Path, stage: str, fp: str, *, durable: bool = True, **info) -> Path:
    """Record the stage in `staging`, then move it to `final` (replacing an earlier output).

    `durable=False` skips the fsyncs, for a stage whose files are not synced either (the fetch and the Neuron
    split: syncing GBs would hold them to the disk's speed), where they cost most: on ext4 an fsync commits the
    journal, which first writes out every block the background writeback has allocated since, 0.4-1.0 s after an
    18 GB fetch on the 16-core host. The rename keeps such a record atomic for every process, and a process's crash
    loses nothing (the page cache outlives it); after a crash of the machine its files may hold less than it says,
    synced record or not."""
    staging, final = Path(staging), Path(final)
    (staging / PARTIAL_RECORD).unlink(missing_ok=True)
    # `files`: what this stage wrote, so a rerun that would replace the folder can tell a file the user added
    write_json_atomic(staging / STAGE_RECORD, {"stage": stage, "fingerprint": fp, "tool_version": __version__,
                                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                **info, "files": file_facts(staging)}, durable=durable)
    if durable:
        fsync_dir(staging)  # the record's name is on disk before the folder can appear under its final name
    testhooks.pause("stage-rename")
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    if durable:
        fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (a crash after a rename must not lose it or undo it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(final: Path, stage: str, fp: str, work, *, force: bool = False, resume: bool = False,
        durable: bool = True) -> dict:
    """One stage, the way every stage runs: skip it when `final` already holds this fingerprint's output;
    else `work(staging)` builds it beside `final` (returning facts for the record), and `finish` renames it.

    resume: keep the staging folder of an interrupted run with the same fingerprint (stages that write
    file by file); otherwise start from an empty one, and remove it when the work fails, since nothing of
    a failed build or compile is reused. durable: see finish. Returns the stage record."""
    final = Path(final)
    if not force and is_done(final, stage, fp):
        log.info("%s: %s is up to date, skipping", stage, final)
        return read_record(final)
    if resume:
        staging = open_staging(final, fp, durable=durable)
    else:
        staging = staging_dir(final)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        info = work(staging) or {}
    except BaseException:
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finish(staging, final, stage, fp, durable=durable, **info)
    return read_record(final)
