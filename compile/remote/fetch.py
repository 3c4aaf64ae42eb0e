"""The fetch stage: a Hub repo, an S3 prefix or a local folder becomes a validated local model folder."""

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmi_compile.pipeline import stages
from lmi_compile.pipeline.diskspace import ensure_room
from lmi_compile.errors import BadInput, BadSetting, LmiCompileError
from lmi_compile.model.config import read_json
from lmi_compile.model.validate import ValidatedModel, validate_model_dir

log = logging.getLogger("lmi_compile")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "local" | "hub" | "s3"
    location: str
    revision: str | None = None

    def describe(self) -> str:
        return f"{self.location}@{self.revision}" if self.revision else self.location


def parse_source(model: str, revision: str | None = None) -> ModelSource:
    """Classify MODEL: s3://..., a local folder (or anything that looks like a path), else a Hub repo id."""
    if model.startswith("s3://"):
        from lmi_compile.remote.s3 import parse_s3_uri

        return ModelSource("s3", str(parse_s3_uri(model)))
    if "://" in model:
        raise BadInput(f"{model}: unsupported URI scheme; use a Hub repo id, s3://bucket/prefix/ or a local folder")
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BadInput(f"{model}: is a file, not a folder; give the model folder that holds config.json")
        return ModelSource("local", str(p))
    if _looks_like_path(model):
        raise BadInput(f"{model}: no local folder named {model} (looked from {Path.cwd()}); check the path")
    from lmi_compile.remote.hub import check_repo_id

    check_repo_id(model)
    return ModelSource("hub", model, revision)


def _looks_like_path(model: str) -> bool:
    """A Hub id is `org/name`; anything with a path's marks, or whose first part is a local folder, is a path."""
    parts = model.replace("\\", "/").split("/")
    return (model.startswith((".", "/", "~")) or "\\" in model or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def fetch(source: ModelSource, output: Path | None, *, token: str | None = None,
          trust_remote_code: bool = False, overwrite: bool = False, listener=None) -> ValidatedModel:
    """Run the fetch stage and validate the result. Local folders are used in place, never copied.

    `listener` (S3 only) hears `listed(sizes, mtimes)` of the prefix, each file and byte range as it lands
    (see s3.download_files), and `weights(rels)` once the small files are in and the weight files are known."""
    if source.kind == "local":
        return validate_model_dir(Path(source.location), trust_remote_code=trust_remote_code)
    if output is None:
        raise BadInput(f"{source.describe()}: remote models need --output (or --work-dir) to download into")
    output = Path(output)
    fp = stage_fingerprint(source, trust_remote_code)
    if stages.is_done(output, "fetch", fp):
        moved = changed_since(source, output, token)
        if moved is None:
            log.info("fetch: %s already in %s, skipping", source.describe(), output)
            return validate_model_dir(output, trust_remote_code=trust_remote_code)
        log.info("fetch: %s %s since it was fetched into %s; fetching it again", source.describe(), moved, output)
    staging, resolved = download(source, output, token=token, trust_remote_code=trust_remote_code,
                                 overwrite=overwrite, listener=listener)
    return record(staging, output, source, resolved, trust_remote_code=trust_remote_code)


def record(staging: Path, output: Path, source: ModelSource, resolved: str, *,
           trust_remote_code: bool) -> ValidatedModel:
    """Record a finished download as the fetch stage (staging renamed to output); the validated model."""
    stages.finish(staging, output, "fetch", stage_fingerprint(source, trust_remote_code), durable=False,
                  source=source.describe(), resolved=resolved)
    log.info("fetch: %s -> %s", source.describe(), output)
    return validate_model_dir(output, trust_remote_code=trust_remote_code)


def download(source: ModelSource, output: Path, *, token: str | None = None, trust_remote_code: bool = False,
             overwrite: bool = False, listener=None, validate: bool = True) -> tuple[Path, str]:
    """The fetch stage's work, unrecorded: download into output's staging folder (resuming what an interrupted
    run left there); (staging, what the source resolved to). `validate=False`: the caller validates (a
    convert that consumes the weights as they land, remote/streaming.py, leaves none to validate)."""
    if (stages.read_record(output) or {}).get("weights_removed"):
        log.info("fetch: the weights in %s were removed after an earlier run converted them (--no-keep-source); "
                 "fetching them again", output)
    stages.claim_output(output, "fetch", overwrite=overwrite)
    staging = stages.staging_dir(output)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        resolved = _download(source, staging, token=token, trust_remote_code=trust_remote_code, listener=listener)
        if validate:
            validate_model_dir(staging, trust_remote_code=trust_remote_code).checkpoint.close()
    except BadSetting:
        raise  # fixed, a rerun resumes: what was downloaded stays
    except BadInput:
        # Bad input will not get better on a rerun: leave nothing behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException:
        # Other failures keep what was downloaded so a rerun resumes; an empty folder helps nobody.
        if not any(p.is_file() for p in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, resolved


def changed_since(source: ModelSource, output: Path, token: str | None) -> str | None:
    """How a remote source no longer holds what its finished fetch in `output` downloaded (None: it does), asked
    of the source: one listing of an S3 prefix, one revision lookup of a Hub branch or tag (a commit cannot move;
    with HF_HUB_OFFLINE set nothing is asked). A changed model must not be compiled from its old copy."""
    rec = stages.read_record(output) or {}
    if source.kind == "s3":
        from lmi_compile.remote.s3 import list_objects, make_client, parse_s3_uri

        mtimes: dict[str, int] = {}
        objects = list_objects(make_client(), parse_s3_uri(source.location), mtimes)
        files = rec.get("files")
        same = isinstance(files, dict) and s3_state(files, objects, mtimes) == rec.get("resolved")
        return None if same else "changed on S3 (objects rewritten, added or removed)"
    if source.kind == "hub":
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE or re.fullmatch(r"[0-9a-f]{40}", source.revision or ""):
            return None

        from lmi_compile.remote.hub import translate_error

        try:
            sha = HfApi(token=token).repo_info(source.location, revision=source.revision).sha
        except Exception as e:
            raise translate_error(e, source.location, source.revision) from None
        return None if sha == rec.get("resolved") else f"moved to commit {sha}"
    return None


def s3_state(rels, sizes: dict[str, int], mtimes: dict[str, int]) -> str:
    """What an S3 fetch resolved to, recorded with it: the fetched objects' names, sizes and modification times."""
    return "s3-objects:" + stages.fingerprint(objects=sorted((r, sizes.get(r), mtimes.get(r)) for r in rels))


def stage_fingerprint(source: ModelSource, trust_remote_code: bool) -> str:
    """What the fetch stage's output depends on."""
    return stages.fingerprint(source=source.kind, location=source.location, revision=source.revision,
                              trust_remote_code=trust_remote_code)


def _download(source: ModelSource, staging: Path, *, token, trust_remote_code, listener=None) -> str:
    """Download into `staging`; return what the source resolved to."""
    if source.kind == "hub":
        from lmi_compile.remote.hub import fetch_hub

        resolved = fetch_hub(source.location, staging, revision=source.revision, token=token,
                             trust_remote_code=trust_remote_code)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    else:
        resolved = _fetch_s3(source.location, staging, trust_remote_code=trust_remote_code, listener=listener)
    return resolved


BESIDE_A_CONSUMER_NICE = 10


def consumer_nice() -> int:
    """The niceness of the workers of a fetch that a convert or split reads as it lands: that consumer (torch's
    import first, seconds of one core) is the command's critical path, and the transfer, which can take every core,
    only has to stay ahead of it. LMI_COMPILE_TRANSFER_NICE=N (0 to 19) sets it."""
    from lmi_compile.remote.s3 import env_number

    forced = env_number("LMI_COMPILE_TRANSFER_NICE", 0, 19)
    return BESIDE_A_CONSUMER_NICE if forced is None else forced


def _fetch_s3(location: str, dest: Path, *, trust_remote_code: bool, listener=None) -> str:
    from lmi_compile.model.files import preferred_index, small_files, weight_files
    from lmi_compile.remote.manifest import MANIFEST_KEY, MARKER_KEY
    from lmi_compile.remote.s3 import Getters, download_files, list_objects, make_client, parse_s3_uri

    uri = parse_s3_uri(location)
    # One set of GET workers for the small files and the weights, started first: they need no botocore, so they
    # are ready by the time it (a quarter second) has loaded here.
    getters = Getters(None, nice=consumer_nice() if listener else 0).start()
    try:
        client = getters.client = make_client()
        mtimes: dict[str, int] = {}
        objects = list_objects(client, uri, mtimes)
        if listener:
            listener.listed(objects, mtimes)
        if MARKER_KEY in objects and MANIFEST_KEY not in objects:
            raise BadInput(f"{uri}: incomplete upload (an lmi-compile push started but never wrote its manifest); "
                           f"rerun the push before using this prefix")
        if not objects:
            raise BadInput(f"{uri}: no objects under this prefix; check the bucket and prefix (it needs a trailing "
                           f"model folder, e.g. s3://bucket/models/llama/)")
        # A prefix published by lmi-compile: every fetched byte is checked against the manifest as it arrives.
        expect = manifest_objects(client, uri) if MANIFEST_KEY in objects else {}
        small = small_files(objects, trust_remote_code=trust_remote_code, source=str(uri))
        download_files(client, uri, small, dest, objects, desc="fetch small files", expect=expect, mtimes=mtimes,
                       listener=listener, getters=getters)
        index_name = preferred_index(objects)
        index = read_json(dest / index_name) if index_name else None
        weights = weight_files(objects, index, index_name, source=str(uri))
        ensure_room(dest, sum(objects[w] for w in weights), "fetch")
        if listener:
            listener.weights(weights)
        download_files(client, uri, weights, dest, objects, desc="fetch weights", expect=expect, mtimes=mtimes,
                       listener=listener, getters=getters)
    finally:
        getters.close()
    return s3_state([*small, *weights], objects, mtimes)


def manifest_objects(client, uri) -> dict[str, dict]:
    """{key: entry} from the upload manifest: entries with a size, a part size and a checksum fetch can check."""
    import json

    from lmi_compile.remote.manifest import MANIFEST_KEY
    from lmi_compile.remote.s3 import translate

    try:
        body = client.get_object(Bucket=uri.bucket, Key=uri.key(MANIFEST_KEY))["Body"].read()
    except Exception as e:
        raise translate(e, f"{uri}{MANIFEST_KEY}") from None
    try:
        objects = json.loads(body).get("objects", {})
    except (ValueError, AttributeError):
        raise LmiCompileError(f"{uri}{MANIFEST_KEY}: not a valid upload manifest; push the model again") from None
    from lmi_compile.remote.manifest import verifying_checksum

    return {rel: e for rel, e in objects.items() if isinstance(e, dict) and {"size", "part_size"} <= e.keys()
            and verifying_checksum(e)}


def finish_consumed(staging: Path, output: Path, source: ModelSource, resolved: str, removed: list[str], *,
                    converted: bool = True) -> None:
    """Record a fetch whose weight files a convert consumed as they landed (--no-keep-source, remote/streaming.py)
    as remove_weights leaves one: config and tokenizer kept, `weights_removed` listed, no fingerprint, so a rerun
    that needs the weights fetches them again instead of trusting a folder that lacks them. `converted=False`:
    the convert was up to date, and the download stopped instead (StreamingFetch.drop_weights)."""
    stages.finish(staging, output, "fetch", None, durable=False, source=source.describe(), resolved=resolved,
                  weights_removed=sorted(removed))
    if converted:
        log.info("fetch: %d weight file(s) removed from %s as they were converted (--no-keep-source); a rerun that "
                 "needs them fetches them again", len(removed), output)
    else:
        log.info("fetch: stopped: the stage that reads the weights was up to date and no later one reads them "
                 "(--no-keep-source); %s keeps config and tokenizer only", output)


def remove_weights(model: ValidatedModel, source: Path) -> None:
    """--no-keep-source: once a stage has consumed them, delete the weight files of a model this tool fetched into
    `source` (never a user's own folder), keep its config and tokenizer, and mark the fetch as not done, so a
    rerun that needs the weights fetches them again instead of trusting a folder that lacks them."""
    root = Path(model.root).resolve()
    if root != Path(source).resolve():
        return  # a local model folder is the user's
    rec = stages.read_record(root)
    if not rec or rec.get("stage") != "fetch" or rec.get("weights_removed"):
        return  # not fetched by us, or consumed already (remote/streaming.py)
    files = [Path(f) for f in model.checkpoint.files]
    model.checkpoint.close()
    # the record first: a crash between the two leaves a folder that reads "fetch again", never a false "done"
    stages.write_json_atomic(root / stages.STAGE_RECORD, {**rec, "fingerprint": None, "weights_removed": [
        f.relative_to(root).as_posix() for f in files]})
    freed = 0
    for f in files:
        try:
            freed += f.stat().st_size
            f.unlink()
        except FileNotFoundError:
            pass
    log.info("fetch: removed %d weight file(s), %.1f GiB, from %s (--no-keep-source); a rerun that needs them "
             "fetches them again", len(files), freed / 2**30, root)
