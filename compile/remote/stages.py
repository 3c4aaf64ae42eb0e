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


def preflight_upload(upload: str | None) -> None:
    """Before any heavy work: the upload URI parses, credentials work, the bucket exists."""
    if upload:
        from lmi_compile.remote.publish import preflight

        preflight(upload)


def push_stage(out: Path, upload: str | None, *, overwrite: bool) -> None:
    """The last stage of every pipeline: publish the laid-out tree, verified, when --upload was given."""
    if upload:
        from lmi_compile.remote.publish import push

        push(out, upload, overwrite=overwrite)
        log.info("published: %s", upload)


