"""Fetch from the HuggingFace Hub (or any server behind HF_ENDPOINT) through huggingface_hub's own client.

The download runs in a child process (`python -m lmi_compile.remote.hub`, the current folder off sys.path):
huggingface_hub's download threads run each file to its end and nothing stops them from outside, so Ctrl-C or a
batch job's SIGTERM would wait for every file in flight (up to 8, GBs each). The parent ends the child instead;
huggingface_hub resumes its partial files (.cache/huggingface/download/*.incomplete) on the rerun.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmi_compile import errors
from lmi_compile.errors import BadInput, BadSetting, LmiCompileError
from lmi_compile.model.config import read_json
from lmi_compile.model.files import preferred_index, small_files, weight_files
from lmi_compile.pipeline.diskspace import ensure_room
from lmi_compile.pipeline.interrupts import check, held
from lmi_compile.pipeline.progress import Progress
from lmi_compile.pipeline.tool import python_module

log = logging.getLogger("lmi_compile")

TOKEN_VAR = "LMI_COMPILE_HF_TOKEN"  # --token, handed to the download child (its environment, not its argv)


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

    # A token refused or lacking access is a setting (BadSetting): a rerun with it fixed resumes what an interrupted
    # fetch downloaded. A repository the Hub says is not there stays bad input: the Hub answers so for a private
    # repository without a valid token too, but that cannot be told from a mistyped id.
    if isinstance(e, GatedRepoError):
        return BadSetting(f"{repo_id}: gated repository; accept its terms on the Hub and pass --token or set HF_TOKEN")
    if isinstance(e, RevisionNotFoundError):
        return BadInput(f"{repo_id}: revision {revision!r} does not exist; check --revision")
    if isinstance(e, RepositoryNotFoundError):
        return BadInput(f"{repo_id}: repository not found or not accessible with the given token "
                        f"(HTTP {getattr(e.response, 'status_code', '?')}) and no local folder has that name; check the id, "
                        f"or pass --token / set HF_TOKEN")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return BadSetting(f"{repo_id}: the Hub refused access (HTTP {status}); pass a valid --token or set "
                              f"HF_TOKEN")
        return LmiCompileError(f"{repo_id}: the Hub answered HTTP {status}; retry later")
    return LmiCompileError(f"{repo_id}: cannot reach the Hub ({type(e).__name__}); check network access and HF_ENDPOINT")


def fetch_hub(repo_id: str, dest: Path, *, revision: str | None, token: str | None,
              trust_remote_code: bool) -> str:
    """Download the needed files of `repo_id` into `dest` (in a child process, ended at once when this run is
    interrupted); return the resolved commit sha."""
    env = dict(os.environ)
    if token:
        env[TOKEN_VAR] = token  # not on the command line, where ps would show it
    request = json.dumps({"repo_id": repo_id, "dest": str(Path(dest).absolute()), "revision": revision,
                          "trust_remote_code": trust_remote_code, "parent": os.getpid(),
                          "verbose": log.getEffectiveLevel() <= logging.DEBUG}).encode()
    proc = None
    try:
        with held():  # a signal during the fork is raised once proc is set, so the child is ended too
            proc = subprocess.Popen(python_module("lmi_compile.remote.hub"), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env)
        while True:
            try:
                out, _ = proc.communicate(request, timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                request = None
                check()  # a stop recorded without raising (a batch node's deferred handler)
    except BaseException:  # interrupted: the files in flight end now, kept partial for the rerun to resume
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    try:
        reply = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LmiCompileError(f"{repo_id}: the Hub download process failed (exit {proc.returncode}, its error is "
                              f"above); rerun to resume") from None
    if "error" in reply:
        cls = getattr(errors, reply["class"], LmiCompileError)
        if not (isinstance(cls, type) and issubclass(cls, LmiCompileError)):
            cls = LmiCompileError
        raise cls(reply["error"], exit_code=reply["exit_code"])
    return reply["sha"]


def _fetch_here(repo_id: str, dest: Path, *, revision: str | None, trust_remote_code: bool) -> str:
    """fetch_hub's work, in the child (--token, if given, in TOKEN_VAR)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    check_repo_id(repo_id)
    token = os.environ.pop(TOKEN_VAR, None)  # --token; else huggingface_hub's own lookup (HF_TOKEN, the login)
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


def _child() -> None:
    """The child's side: one request (JSON) on stdin, one reply line ({"sha"} or {"error", "class",
    "exit_code"}, every failure as one line) on the stdout it was given; anything else printed goes to stderr."""
    from lmi_compile.pipeline.progress import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent too, which ends this process
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    text = sys.stdin.read()
    if not text:  # the parent ended before it asked
        return
    req = json.loads(text)

    def orphaned() -> None:  # the parent was killed (SIGKILL): stop downloading for nobody
        while os.getppid() == req["parent"]:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    setup_logging(req["verbose"])
    try:
        out = {"sha": _fetch_here(req["repo_id"], Path(req["dest"]), revision=req["revision"],
                                  trust_remote_code=req["trust_remote_code"])}
    except LmiCompileError as e:
        out = {"error": str(e), "class": type(e).__name__, "exit_code": e.exit_code}
    except OSError as e:  # disk full, permissions: named, one line, as the CLI reports them
        out = {"error": errors.os_error_text(e), "class": "LmiCompileError", "exit_code": 1}
    except Exception as e:
        if req["verbose"]:
            log.exception("Hub download")
        first = str(e).splitlines()[0][:300] if str(e) else ""
        out = {"error": f"unexpected {type(e).__name__} in the Hub download: {first} (a bug in lmi-compile; rerun "
                        f"with --verbose for the traceback and report it)", "class": "LmiCompileError", "exit_code": 1}
    reply.write(json.dumps(out) + "\n")
    reply.close()


if __name__ == "__main__":
    _child()
