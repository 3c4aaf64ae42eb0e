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


def test_weights_rewritten_in_place_change_what_stages_are_fingerprinted_with(model_copy):
    """A weight file replaced by one of the same size (a re-download, a fine-tune saved over it): every stage's
    fingerprint takes Checkpoint.identity(), so a rerun converts again instead of keeping the old output."""
    from lmi_compile.model.checkpoint import Checkpoint

    m = model_copy()
    f = m / "model.safetensors"
    before = Checkpoint(m).identity()
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert f.stat().st_size == st.st_size and Checkpoint(m).identity() != before


def test_a_stage_runs_again_only_when_forced_or_changed(tmp_path):
    """stages.run skips a stage whose folder holds this stage's output for these inputs; --force, other inputs or
    another stage's record run it again; a resumed staging folder of other inputs starts empty; what is published
    holds no bookkeeping of the run (the partial record, the replaced folder)."""
    runs = []

    def work(staging):
        runs.append(staging)
        (staging / "rank0.safetensors").write_text(str(len(runs)))

    final = tmp_path / "work" / "checkpoint"
    stages.run(final, "convert", "fp1", work, resume=True)
    stages.run(final, "convert", "fp1", work, resume=True)
    assert len(runs) == 1 and not stages.is_done(final, "build", "fp1")
    stages.run(final, "convert", "fp1", work, force=True)
    stages.run(final, "convert", "fp2", work, resume=True)
    assert len(runs) == 3 and (final / "rank0.safetensors").read_text() == "3"
    assert sorted(p.name for p in final.parent.iterdir()) == ["checkpoint"]  # no staging or replaced folder left
    assert not (final / stages.PARTIAL_RECORD).exists()

    def interrupted(staging):
        (staging / "rank1.safetensors").write_text("of fp3")
        raise KeyboardInterrupt

    try:
        stages.run(final, "convert", "fp3", interrupted, resume=True)
    except KeyboardInterrupt:
        pass
    stages.run(final, "convert", "fp4", work, resume=True)
    assert sorted(p.name for p in final.iterdir() if not p.name.startswith(".")) == ["rank0.safetensors"]


def test_an_output_is_replaced_only_when_it_is_this_stages_own(tmp_path):
    """claim_output: a folder another stage made (a fetched model given as --output) or one whose record cannot say
    what it wrote (lmi-compile 0.1.0 kept no file list) is refused without --overwrite."""
    import json

    import pytest

    from lmi_compile.errors import BadInput

    fetched = tmp_path / "fetched"
    staging = stages.open_staging(fetched, "fp")
    (staging / "config.json").write_text("{}")
    stages.finish(staging, fetched, "fetch", "fp")
    stages.claim_output(fetched, "fetch", overwrite=False)  # a rerun of the same stage may replace it
    with pytest.raises(BadInput, match="fetched: folder is not empty and is not an lmi-compile layout output"):
        stages.claim_output(fetched, "layout", overwrite=False)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / stages.STAGE_RECORD).write_text(json.dumps({"stage": "layout", "fingerprint": "fp"}))
    with pytest.raises(BadInput, match=f"{stages.STAGE_RECORD}: added or changed since lmi-compile wrote"):
        stages.claim_output(old, "layout", overwrite=False)
    stages.claim_output(old, "layout", overwrite=True)
