"""Fetch from the HuggingFace Hub (or any server behind HF_ENDPOINT) through huggingface_hub's own client."""

import logging
from pathlib import Path

from lmi_compile.pipeline.diskspace import ensure_room
from lmi_compile.errors import BadInput, LmiCompileError
from lmi_compile.model.config import read_json
from lmi_compile.model.files import preferred_index, small_files, weight_files
from lmi_compile.pipeline.progress import Progress

log = logging.getLogger("lmi_compile")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInput(f"{repo_id!r}: not a valid Hub repo id ({str(e).splitlines()[0][:120]}); "
                       f"use namespace/name, an s3:// prefix, or an existing local folder") from None


def translate_error(e: Exception, repo_id: str, revision: str | None) -> LmiCompileError:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(e, GatedRepoError):
        return BadInput(f"{repo_id}: gated repository; accept its terms on the Hub and pass --token or set HF_TOKEN")
    if isinstance(e, RevisionNotFoundError):
        return BadInput(f"{repo_id}: revision {revision!r} does not exist; check --revision")
    if isinstance(e, RepositoryNotFoundError):
        return BadInput(f"{repo_id}: repository not found or not accessible with the given token "
                        f"(HTTP {getattr(e.response, 'status_code', '?')}) and no local folder has that name; check the id, "
                        f"or pass --token / set HF_TOKEN")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return BadInput(f"{repo_id}: the Hub refused access (HTTP {status}); pass a valid --token or set HF_TOKEN")
        return LmiCompileError(f"{repo_id}: the Hub answered HTTP {status}; retry later")
    return LmiCompileError(f"{repo_id}: cannot reach the Hub ({type(e).__name__}); check network access and HF_ENDPOINT")


def fetch_hub(repo_id: str, dest: Path, *, revision: str | None, token: str | None,
              trust_remote_code: bool) -> str:
    """Download the needed files of `repo_id` into `dest`; return the resolved commit sha."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    check_repo_id(repo_id)
    api = HfApi(token=token)
    source = f"{repo_id}@{revision or 'main'}"
    try:
        info = api.repo_info(repo_id, revision=revision)
        sha = info.sha
        files = {f.path: f.size for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
                 if isinstance(f, RepoFile)}
    except Exception as e:
        raise translate_error(e, repo_id, revision) from None

    def download(patterns: list[str]) -> None:
        try:
            snapshot_download(repo_id, revision=sha, local_dir=dest, allow_patterns=patterns, token=token,
                              tqdm_class=Progress, max_workers=8)
        except Exception as e:
            raise translate_error(e, repo_id, revision) from None

    small = small_files(files, trust_remote_code=trust_remote_code, source=source)
    download(small)
    index_name = preferred_index(files)
    index = read_json(dest / index_name) if index_name else None
    weights = weight_files(files, index, index_name, source=source)
    needed = sum(files[w] or 0 for w in weights)
    ensure_room(dest, needed, "fetch")
    log.info("fetching %d weight file(s), %.1f MiB, from %s", len(weights), needed / 2**20, source)
    download(weights)
    return sha
