"""Stage bookkeeping (pipeline/stages.py): a stage folder takes its final name only after its record is on disk."""

import os

from lmi_compile.pipeline import stages


def test_finish_syncs_the_record_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    root = tmp_path.resolve()
    final = root / "checkpoint"
    staging = stages.open_staging(final, "fp1")
    (staging / "rank0.safetensors").write_bytes(b"x")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    stages.finish(staging, final, "convert", "fp1")
    rename = events.index(("replace", str(staging), str(final)))
    record = str(staging / stages.STAGE_RECORD)
    tmp = str(staging / f".{stages.STAGE_RECORD}.tmp-")
    data_synced = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1].startswith(tmp)]
    named = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == record]
    dir_synced = [i for i, e in enumerate(events) if e == ("fsync", str(staging))]
    assert data_synced and named and dir_synced, events
    assert data_synced[0] < named[0] < dir_synced[0] < rename, events  # bytes, then name, then the folder's entry
    assert ("fsync", str(root)) in events[rename:], events  # and the rename itself is made durable
    assert stages.is_done(final, "convert", "fp1") and not stages.is_done(final, "convert", "fp2")
