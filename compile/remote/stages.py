"""The remote ends of every pipeline: the fetch stage first, the push stage last (and its pre-flight)."""

import logging
from pathlib import Path

from lmi_compile.model.validate import ValidatedModel
from lmi_compile.pipeline.workdir import WorkDir
from lmi_compile.remote.fetch import fetch, parse_source

log = logging.getLogger("lmi_compile")


def fetch_stage(model: str, work: WorkDir, *, revision, token, trust_remote_code) -> ValidatedModel:
    """Local folders are used in place; remote models land in work/source."""
    source = parse_source(model, revision)
    return fetch(source, work.source if source.kind != "local" else None, token=token,
                 trust_remote_code=trust_remote_code)


def preflight_upload(job) -> None:
    """Before any heavy work: the upload URI parses, credentials work, the bucket exists, the prefix is free
    (or this output's own upload, made with this job's options, or --overwrite)."""
    if job.upload:
        from lmi_compile.remote.publish import preflight

        preflight(job.upload, job.output, overwrite=job.overwrite, made_with=job.made_with(given=True))


def push_stage(out: Path, upload: str | None, *, overwrite: bool) -> None:
    """The last stage of every pipeline: publish the laid-out tree, verified, when --upload was given."""
    if upload:
        from lmi_compile.remote.publish import push

        push(out, upload, overwrite=overwrite)
        log.info("published: %s", upload)




def source_after(job, stream, model: ValidatedModel, out: Path, stage: str, *, last: bool) -> ValidatedModel | None:
    """After the stage that reads the model's weights (convert, split) wrote `out`: the source model the later
    stages use (the verified one, once a stream settles), handed to a batch build node when asked, its weights
    removed with --no-keep-source. None when `stage` was the last asked for and was up to date, so the
    download it did not wait for is dropped instead (remote/streaming.py)."""
    from lmi_compile.pipeline import observe
    from lmi_compile.remote import streaming
    from lmi_compile.remote.fetch import remove_weights

    if last and streaming.dropped_unneeded(stream, job.work, job.keep_source):
        return None
    if stream and not job.keep_source and stream.result is None:  # the stage was up to date: it never settled
        model = stream.drop_weights()
    elif stream:
        model = stream.settle()
    if job.handover_out:  # `lmi-compile batch`: the next stage runs on another node (batch/handover.py)
        from lmi_compile.batch.handover import send

        observe.stage("handover-push")
        send(job.handover_out, job.work.root, model.root, out, stage)
    if not job.keep_source:
        remove_weights(model, job.work.source)
    return model
