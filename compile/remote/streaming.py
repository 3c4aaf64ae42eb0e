"""Convert while the model downloads: the S3 fetch runs in a background thread and the convert reads each
tensor as soon as its bytes have landed.

The fetch is the ordinary fetch stage (same staging folder, checks, resume and record); it only reports each
file and byte range as it lands. The convert reads through a folder of hard links to the files being
downloaded (`.NAME.arriving` beside the source folder), so its paths stay valid while the fetch renames
files and then its folder into place. Rank files are written at planned offsets, so tensors may arrive in
any order; each convert task waits for its source bytes. The convert stage counts as done only after the
fetch finished and verified every byte against the upload manifest: a convert fed a corrupt byte is never
recorded as finished, and a rerun converts again from the verified source.

With --no-keep-source the convert consumes the model: each safetensors shard is deleted (truncated first, so
its blocks are freed though readers hold it open) once the fetch has verified it and every convert task that
reads it has finished, and the fetch is recorded as remove_weights leaves one (config and tokenizer kept). The
download brings the shards in order, a few at a time, so the source on disk stays a few shards, not a second
copy of the model. Pickled .bin files are mmapped by torch and go only at the end. A thread of its own deletes
them: truncating a GB shard waits for the pages the kernel is writing back, 0.1-0.6 s each on the 16-core host,
which under the lock every download and convert thread takes held a 22-layer convert 1.5-2 s longer.

The fetch thread downloads and verifies; the stage is recorded by settle(), in the main thread, once the
convert is done with the files.

The convert's fingerprint is taken from the listing (names, sizes, LastModified), which is what the fetched
files carry once complete (the fetch gives them their object's LastModified as mtime), so a rerun on the
finished source folder finds the convert up to date.
"""

import contextlib
import logging
import os
import queue
import shutil
import threading
from pathlib import Path

from lmi_compile.errors import Interrupted
from lmi_compile.pipeline import stages
from lmi_compile.pipeline.interrupts import STOP, import_held, received

log = logging.getLogger("lmi_compile")


# A held-back shard's head, fetched up front for its safetensors header (tens of KB even for a 405B model's shards;
# a larger header makes the convert wait on the shard, which admits it).
HEAD_BYTES = 1024 * 1024


class Cancelled(Exception):
    """The run that started this fetch gave up (it failed or was interrupted): stop downloading."""


class ArrivingModel:
    """What has landed of a model being fetched: files (by relative name) and their byte ranges."""

    def __init__(self, view: Path, staging: Path | None = None):
        self.view, self.staging = view, staging
        lock = threading.RLock()
        self._cv = threading.Condition(lock)  # bytes landed, files verified, the fetch ended
        self._room = threading.Condition(lock)  # for the fetch's admit: a shard removed, a file wanted, no lead
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # rel -> merged [start, end) ranges
        self._sizes: dict[str, int] = {}
        self._weights: list[str] | None = None
        self.sizes: dict[str, int] = {}
        self.mtimes: dict[str, int] = {}
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self.unlinkable = False  # the filesystem refused a hard link: the convert waits for the whole fetch
        self._verified: set[str] = set()
        self.reads: dict[str, int] | None = None  # consuming (--no-keep-source): reads left per weight file
        self.removed: list[str] = []  # decided under the lock; the files go in the remover thread
        self._doomed: queue.Queue = queue.Queue()
        self._remover: threading.Thread | None = None
        self._remove_error: Exception | None = None
        self.lead: int | None = None  # consuming: bytes of weight files the download may hold ahead (lead_bytes)
        self._admitted: dict[str, int] = {}  # weight files the download has started (rel -> size)
        self._held = 0  # bytes of admitted shards not yet removed
        self._wanted: set[str] = set()  # files a convert task waits on that the download holds back
        self.head_bytes = HEAD_BYTES  # what the download brings of a held-back shard: its header

    # --- heard from the fetch (download threads) ---
    def listed(self, sizes: dict[str, int], mtimes: dict[str, int]) -> None:
        self.sizes, self.mtimes = dict(sizes), dict(mtimes)

    def _link(self, rel: str, path: Path) -> None:
        if self.unlinkable:
            return
        dst = self.view / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            os.link(path, dst)
        except OSError as e:
            log.info("fetch: cannot hard-link %s (%s); converting once the download is complete", path, e.strerror)
            with self._cv:
                self.unlinkable = True
                self._cv.notify_all()

    def kept(self, rel: str, path: Path) -> None:
        self._check_cancelled()
        self._link(rel, path)
        with self._cv:
            self._ranges[rel] = [(0, path.stat().st_size)]
            self._cv.notify_all()
        self.verified(rel, path)  # kept files were checked again from disk

    def opened(self, rel: str, tmp: Path) -> None:
        self._check_cancelled()
        self._link(rel, tmp)
        with self._cv:
            self._ranges[rel] = []

    def arrived(self, rel: str, start: int, end: int) -> None:
        self._check_cancelled()
        with self._cv:
            self._ranges[rel] = _merge(self._ranges.get(rel, []), (start, end))
            self._cv.notify_all()

    def verified(self, rel: str, path: Path) -> None:
        with self._cv:
            self._verified.add(rel)
            self._release(rel)

    def weights(self, rels: list[str]) -> None:
        with self._cv:
            self._weights = list(rels)
            self._cv.notify_all()

    def finished(self, error: BaseException | None) -> None:
        with self._cv:
            self.done, self.error = True, error
            self._cv.notify_all()

    def _check_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("the run that started this fetch stopped")

    # --- asked by the convert ---
    def _wait(self, pred) -> None:
        """Wait until pred() holds (under the lock); raise the fetch's error if it failed first."""
        with self._cv:
            while not pred():
                if self.error is not None:
                    raise self.error
                if self.done:
                    return  # finished: everything there is has landed
                if STOP.is_set():
                    raise Interrupted(received())
                self._cv.wait(0.2)

    def wait_range(self, rel: str, start: int, end: int) -> None:
        def landed() -> bool:
            if any(s <= start and end <= e for s, e in self._ranges.get(rel, [])) or start >= end:
                return True
            held_back = rel not in self._admitted and rel not in self._wanted
            if self.lead is not None and held_back and self._ranges.get(rel):
                self._wanted.add(rel)  # its head is in, not this range: held back, and needed now
                self._room.notify_all()
            return False

        self._wait(landed)

    def wait_weights(self) -> list[str]:
        """The weight files, once the small files are in and every weight file's safetensors header has landed."""
        self._wait(lambda: self._weights is not None or self.unlinkable)
        if self.unlinkable or self._weights is None:
            return []
        for rel in self._weights:
            if rel.endswith(".safetensors"):
                self.wait_range(rel, 0, 8)
                with open(self.view / rel, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                self.wait_range(rel, 0, min(8 + n, _size(self.view / rel)))
            else:
                self.wait_range(rel, 0, self.sizes[rel])  # pickles are read whole (the listing's size: the file
                # may not be linked yet)
        return self._weights

    # --- asked by the fetch before it starts a weight file (consuming only: lead is set) ---
    def admit(self, rel: str, size: int, first: bool) -> bool:
        """May the download start `rel` now (else it brings only its head, `head_bytes`)? Yes while the files started
        and not yet removed stay within `lead` (for the first file still waiting, in order: `first`), when none is held,
        and whenever a convert task waits on it. Downloaded far ahead, a consumed model's shards pass the kernel's mark
        for background writeback before the convert reaches them, and are written to disk only to be deleted: a 28-layer
        (14 GB) consumed convert wrote 19.7-21.7 GB where a local one wrote 15.4, and took 1.31x as long (16-core host,
        128 GB)."""
        self._check_cancelled()
        with self._cv:
            # pickles (.bin) are deleted only at the end: held back, they would only come one at a time
            if (self.lead is None or rel not in (self._weights or ()) or rel in self._admitted
                    or not rel.endswith(".safetensors")):
                return True
            if rel not in self._wanted and not (first and (self._held == 0 or self._held + size <= self.lead)):
                return False
            self._admitted[rel] = size
            self._held += size
            return True

    def wait_for_room(self, timeout: float) -> None:
        """Until a shard is removed, a task waits on a held-back file, the lead is lifted, or `timeout` passes."""
        self._check_cancelled()
        with self._cv:
            self._room.wait(timeout)

    def unleash(self) -> None:
        """The convert is done reading: the rest of the download runs without a lead."""
        with self._cv:
            self.lead = None
            self._room.notify_all()

    # --- consumed (--no-keep-source) ---
    def plan_reads(self, rels: list[str]) -> None:
        """The convert's reads, a file name per task that reads it: from now on each shard goes after its last."""
        with self._cv:
            self.reads = {}
            for rel in rels:
                self.reads[rel] = self.reads.get(rel, 0) + 1
            for rel in list(self._verified):
                self._release(rel)

    def read_done(self, rel: str) -> None:
        with self._cv:
            if self.reads is not None:
                self.reads[rel] = self.reads.get(rel, 1) - 1
                self._release(rel)

    def _release(self, rel: str) -> None:
        """(under the lock) Delete a verified safetensors shard no task will read again."""
        if (self.reads is None or self.reads.get(rel, 0) > 0 or rel not in self._verified
                or not rel.endswith(".safetensors") or rel not in (self._weights or ()) or rel in self.removed):
            return
        self._doom(rel)

    def _doom(self, rel: str) -> None:
        """(under the lock) Hand a weight file to the remover thread (each remover has its own queue: one that is
        being stopped never takes another's files or stop mark)."""
        self.removed.append(rel)
        if rel in self._admitted:
            self._held -= self._admitted[rel]
            self._room.notify_all()  # room for the download (admit)
        if self._remover is None:
            self._remover = threading.Thread(target=self._removing, args=(self._doomed,), name="remove-shards",
                                             daemon=True)
            self._remover.start()
        self._doomed.put(rel)

    def _removing(self, doomed: queue.Queue) -> None:
        while True:
            rel = doomed.get()
            if rel is None:  # stopped
                doomed.task_done()
                return
            try:
                self._remove(rel)
            except Exception as e:  # reported by remove_rest, before the fetch is recorded as consumed
                self._remove_error = self._remove_error or e
            finally:
                doomed.task_done()

    def _remove(self, rel: str) -> None:
        for folder in (self.view, self.staging):
            if folder is None:
                continue
            path = folder / rel
            try:
                os.truncate(path, 0)  # frees the blocks now: a reader may still hold the file open
                path.unlink()
            except FileNotFoundError:
                pass
        log.debug("fetch: %s converted and removed (--no-keep-source)", rel)

    def removals_done(self, stop: bool = False) -> None:
        """Wait until every file handed to the remover is gone (not under the lock); `stop`: and end it (a later
        removal, drop_weights', starts another)."""
        with self._cv:
            doomed, remover = self._doomed, self._remover
            if stop and remover is not None:
                self._doomed, self._remover = queue.Queue(), None
                doomed.put(None)
        doomed.join()
        if stop and remover is not None:
            remover.join()

    def remove_rest(self) -> list[str]:
        """Delete the weight files still there (pickles; shards no task read) and wait for every removal; every
        weight file's name."""
        with self._cv:
            for rel in self._weights or ():
                if rel not in self.removed:
                    self._doom(rel)
            weights = list(self._weights or ())
        self.removals_done()
        if self._remove_error is not None:
            raise self._remove_error
        return weights


def lead_bytes() -> int:
    """How far a consumed download may run ahead of its convert: half the dirty memory at which the kernel starts
    writing back in the background (vm.dirty_background_bytes, else dirty_background_ratio of the memory
    available), so the shards in between are deleted before any is written; at least 256 MiB.
    LMI_COMPILE_STREAM_LEAD_MIB sets it."""
    from lmi_compile.remote.s3 import env_number

    forced = env_number("LMI_COMPILE_STREAM_LEAD_MIB", 1, 1 << 30)
    if forced is not None:
        return forced << 20
    try:
        mark = int(Path("/proc/sys/vm/dirty_background_bytes").read_text())
        if not mark:
            ratio = int(Path("/proc/sys/vm/dirty_background_ratio").read_text())
            meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            available = int(meminfo["MemAvailable"].split()[0]) * 1024
            room = _cgroup_room()
            mark = min(available, available if room is None else room) * ratio // 100
    except (OSError, ValueError, KeyError):  # not Linux: as 10% of 20 GB
        mark = 2 << 30
    return max(256 << 20, mark // 2)


def _cgroup_room() -> int | None:
    """What this process's memory cgroup (v2) still allows, where it sets a limit: the kernel scales its writeback
    marks to it, and a container sees the host's /proc/meminfo."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def _size(path: Path) -> int:
    return path.stat().st_size


def _merge(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    s, e = new
    for a, b in sorted(ranges + [(s, e)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class StreamingFetch:
    """An S3 fetch in a background thread, with the model it is bringing readable as it lands.

    consume (--no-keep-source): a convert that plans its reads (feed().plan) has each shard deleted after it."""

    def __init__(self, source, work, *, trust_remote_code: bool, consume: bool = False):
        self.source, self.work = source, work
        self.trust_remote_code, self.consume = trust_remote_code, consume
        self.staging = stages.staging_dir(work.source)
        self.view = self.staging.with_name(f".{work.source.name}.arriving")
        shutil.rmtree(self.view, ignore_errors=True)
        self.view.mkdir(parents=True)
        self.arriving = ArrivingModel(self.view, self.staging)
        if consume:
            self.arriving.lead = lead_bytes()
        self.resolved: str | None = None
        self.streamed = None  # the model as the convert reads it
        self.result = None  # the recorded fetch, once settled
        self._thread = threading.Thread(target=self._fetch, name="fetch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        from lmi_compile.remote.fetch import download

        try:
            _, self.resolved = download(self.source, self.work.source, trust_remote_code=self.trust_remote_code,
                                        listener=self.arriving, validate=False)
        except BaseException as e:  # handed to the main thread, which reports it
            self.arriving.finished(e)
        else:
            self.arriving.finished(None)

    def model(self):
        """The model as the convert sees it: config and tokenizer from the view, tensors read as they land,
        fingerprinted as the finished source folder will be."""
        from lmi_compile.model.validate import ValidatedModel, validate_model_dir

        a = self.arriving
        a.wait_weights()
        if a.unlinkable or a.done:
            if not self.consume:
                return self.settle()  # complete already, or it cannot be read while it lands
            self._wait_fetched()
        folder = self.staging if a.unlinkable else self.view  # unlinkable: complete in the staging folder
        seen = validate_model_dir(folder, trust_remote_code=self.trust_remote_code)
        ck = seen.checkpoint
        identity = self._listing_identity(ck, folder)
        ck.identity = lambda: identity  # what Checkpoint(source).identity() reads once the files are complete
        self.streamed = ValidatedModel(self.work.source, seen.config, ck, seen.custom_code)
        return self.streamed

    def _listing_identity(self, ck, folder: Path) -> list:
        a = self.arriving
        rels = [f.relative_to(folder).as_posix() for f in ck.files]
        return [[f.name, a.sizes[rel], a.mtimes.get(rel, _mtime(f))] for f, rel in zip(ck.files, rels)]

    def _rel(self, path: Path) -> str | None:
        for folder in (self.view, self.staging):
            if path.is_relative_to(folder):
                return path.relative_to(folder).as_posix()
        return None  # a complete folder

    def feed(self, ck) -> "Feed":
        """What a converter reading `ck` (this stream's model) calls around each task: see Feed."""
        return Feed(self, ck)

    @property
    def verified(self) -> bool:
        """The fetch finished and every byte matched (what a convert's output may be kept on)."""
        return self.arriving.done and self.arriving.error is None

    def _wait_fetched(self) -> None:
        self.arriving.unleash()
        self._thread.join()
        if self.arriving.error is not None:
            raise self.arriving.error

    def settle(self):
        """Wait for the verified fetch and record it; the source model for the stages after the convert (a
        consumed one keeps its config and tokenizer only). Raises the fetch's error."""
        from lmi_compile.model.validate import validate_model_dir
        from lmi_compile.remote.fetch import finish_consumed, record

        self._wait_fetched()
        if self.result is None:
            if self.arriving.reads is not None:  # consumed: the convert read every shard it needed
                finish_consumed(self.staging, self.work.source, self.source, self.resolved,
                                self.arriving.remove_rest())
                self.result = self.streamed  # rooted at the source folder already
            else:
                validate_model_dir(self.staging, trust_remote_code=self.trust_remote_code).checkpoint.close()
                self.result = record(self.staging, self.work.source, self.source, self.resolved,
                                     trust_remote_code=self.trust_remote_code)
        return self.result

    def drop_weights(self):
        """--no-keep-source, and the stage that reads the weights was up to date: no later stage reads them, so
        the download stops (a rerun after a failed build does not bring the whole model again to delete it) and
        the fetch is recorded as consumed, config and tokenizer kept (verified: they landed before the weights'
        headers this stage read). The source model for the later stages."""
        from lmi_compile.remote.fetch import finish_consumed

        self.close()  # the fetch thread has ended (stopped, finished or failed: its weights are not needed)
        weights = self.arriving.remove_rest()
        finish_consumed(self.staging, self.work.source, self.source, self.resolved or self.source.location, weights,
                        converted=False)
        self.result = self.streamed  # rooted at the source folder already
        return self.result

    def close(self) -> None:
        """Stop the fetch if it still runs (a failure or interrupt elsewhere) and remove the view."""
        self.arriving.cancelled = True
        self._thread.join()
        self.arriving.removals_done(stop=True)  # no file of this run is truncated after it returns
        shutil.rmtree(self.view, ignore_errors=True)


class Feed:
    """A converter's side of a stream: plan(sources per task) before the first task, ready(sources) before a task
    reads (blocks until those tensors' bytes have landed), done(sources) after (a consuming stream deletes each
    shard after the last task that reads it)."""

    def __init__(self, stream: StreamingFetch, ck):
        self.stream, self.ck = stream, ck

    def _rels(self, sources) -> list[str]:
        rels = {self.stream._rel(self.ck.tensors[name].file) for name in sources}
        return sorted(r for r in rels if r is not None)

    def plan(self, tasks) -> None:
        if self.stream.consume:
            self.stream.arriving.plan_reads([rel for sources in tasks for rel in self._rels(sources)])

    def ready(self, sources) -> None:
        for name in sources:
            info = self.ck.tensors[name]
            rel = self.stream._rel(info.file)
            if rel is None:
                continue
            if info.offset is None:
                self.stream.arriving.wait_range(rel, 0, _size(info.file))
            else:
                self.stream.arriving.wait_range(rel, info.offset, info.offset + info.nbytes)

    def done(self, sources) -> None:
        if self.stream.consume:
            for rel in self._rels(sources):
                self.stream.arriving.read_done(rel)


def dropped_unneeded(stream: StreamingFetch | None, work, keep_source: bool) -> bool:
    """After a convert or split that was up to date (one that runs waits for the verified fetch), when nothing
    after it needs the weights (--no-keep-source, the last stage asked for): stop the download and drop its
    partial copy. True when it did."""
    if stream is None or keep_source or stream.arriving.done:
        return False
    stream.close()
    shutil.rmtree(stages.staging_dir(work.source), ignore_errors=True)
    return True


@contextlib.contextmanager
def unverified_output_discarded(stream: StreamingFetch | None, staging: Path):
    """Around a stage that reads a model as it lands: if it fails (or is interrupted) before the fetch verified
    every byte, what it wrote goes, so a rerun does not keep files made of bytes nobody checked (a rank file
    whose plan matches is otherwise kept), and makes them again from the verified source."""
    try:
        yield
    except BaseException:
        if stream is not None and not stream.verified:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@contextlib.contextmanager
def opened(job, wanted: bool):
    """A pipeline's source as its first stage reads it: a StreamingFetch when `wanted` and the model is on S3 and
    not fetched yet (--no-keep-source: consumed), else None; stopped and its view removed on the way out."""
    stream = start(job.model, job.work, revision=job.revision, trust_remote_code=job.trust_remote_code,
                   consume=not job.keep_source) if wanted else None
    try:
        yield stream
    finally:
        if stream:
            stream.close()


def first_model(job, stream: StreamingFetch | None):
    """The model the first stage reads: the stream's, tensors read as they land, or the fetch stage's."""
    if stream:
        # The stage reading the stream (convert, split) needs torch, seconds to import (more with a CUDA build):
        # imported now, while the listing and the headers come, not after them and the first shards.
        with contextlib.suppress(ImportError):  # that stage reports a missing torch itself
            import_held("torch")
        return stream.model()
    from lmi_compile.remote.stages import fetch_stage

    return fetch_stage(job.model, job.work, revision=job.revision, token=job.token,
                       trust_remote_code=job.trust_remote_code)


def start(model: str, work, *, revision, trust_remote_code: bool, consume: bool = False) -> StreamingFetch | None:
    """A StreamingFetch for an S3 model whose fetch stage is not yet done; None where the ordinary fetch
    stage applies (local folders, the Hub, a finished fetch)."""
    from lmi_compile.remote.fetch import parse_source, stage_fingerprint

    source = parse_source(model, revision)
    if source.kind != "s3":
        return None
    # A finished fetch goes to the fetch stage, which asks S3 whether the prefix changed since (once: asking here
    # too cost a second listing and botocore client on every rerun) and fetches a changed one again
    if stages.is_done(work.source, "fetch", stage_fingerprint(source, trust_remote_code)):
        return None
    log.info("fetch: converting while %s downloads", source.describe())
    return StreamingFetch(source, work, trust_remote_code=trust_remote_code, consume=consume)
