"""Stage hand-over between the nodes of a batch: the CPU stages' output goes through --staging on S3.

On a cluster a job's fetch and convert (trtllm) or split (neuron) run on a CPU node, its build or compile on a
node with its GPU type or NeuronCores; nodes share no disk. The CPU node ends its run (`--handover-out URI`) by
publishing, with the verified push, a tree of:

    <stage>/      the finished stage folder (trtllm `checkpoint`, neuron `split`)
    model/        the model's config, generation and tokenizer files (what build, layout and checks read)
    stages.json   the stage records: the finished stage's (its fingerprint) and the fetch's

The push's manifest, written last, is what marks the hand-over complete; its content_id is the stage's
fingerprint. The build node (`--handover-in URI`) fetches it with the verified fetch (every byte against the
manifest's checksums) and installs the stage folder under its stage record, so the pipeline takes it as done by
its fingerprint and resumes at the next stage; a rerun on the same node finds it done and downloads nothing.
The weights themselves are never fetched on the build node.
"""

import json
import logging
import shutil
from pathlib import Path

from lmi_compile.errors import LmiCompileError
from lmi_compile.pipeline import stages

log = logging.getLogger("lmi_compile")

STAGE_OF = {"trtllm": "convert", "neuron": "split"}  # the last CPU stage of each backend, handed over
RECORDS = "stages.json"
MODEL = "model"
OUT_DIR, IN_DIR = "handover-out", "handover-in"


def send(uri: str, work_root: Path, model_root: Path, folder: Path, stage: str) -> None:
    """Publish the finished stage `folder` and the model's small files to `uri` (verified push, manifest last)."""
    from lmi_compile.model.files import carried_files
    from lmi_compile.pipeline.workdir import place
    from lmi_compile.remote.publish import push

    record = stages.read_record(folder)
    if not record or record.get("stage") != stage:
        raise LmiCompileError(f"{folder}: no finished {stage} stage to hand over")
    out = Path(work_root) / OUT_DIR
    shutil.rmtree(out, ignore_errors=True)
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            place(p, out / stage / rel)  # hard links: no copy of the checkpoint
    for f in carried_files(Path(model_root)):  # hf_quant_config.json included
        place(f, out / MODEL / f.name)
    stages.write_json_atomic(out / RECORDS, {"stage": stage, "record": record,
                                             "fetch": stages.read_record(model_root)})
    # The push's content_id is this record's fingerprint: the stage's, so the manifest names what it holds.
    stages.write_json_atomic(out / stages.STAGE_RECORD, {"stage": "handover", "fingerprint": record["fingerprint"],
                                                         "files": stages.file_facts(out)})
    log.info("handover: publishing the %s stage to %s for the build node", stage, uri)
    push(out, uri, overwrite=True)  # the prefix is this job's own (STAGING/handover/NAME-FINGERPRINT/)
    shutil.rmtree(out, ignore_errors=True)


def published(uri: str, client=None) -> dict | None:
    """The hand-over's manifest when its push finished (None: absent or incomplete)."""
    from lmi_compile.remote.manifest import read_manifest
    from lmi_compile.remote.s3 import make_client, parse_s3_uri

    manifest = read_manifest(client or make_client(), parse_s3_uri(uri))
    return manifest if manifest and manifest.get("content_id") else None


def receive(uri: str, work, stage: str, final: Path):
    """Fetch the hand-over at `uri` into `work` and install its stage folder at `final` under its record.

    Returns (the model: config and small files, no weights; the stage folder; its fingerprint)."""
    from lmi_compile.model.config import ModelConfig
    from lmi_compile.model.validate import ValidatedModel
    from lmi_compile.pipeline.workdir import place
    from lmi_compile.remote.fetch import manifest_objects
    from lmi_compile.remote.manifest import MANIFEST_KEY, MARKER_KEY
    from lmi_compile.remote.s3 import download_files, list_objects, make_client, parse_s3_uri

    u = parse_s3_uri(uri)
    client = make_client()
    mtimes: dict[str, int] = {}
    objects = list_objects(client, u, mtimes)
    if MANIFEST_KEY not in objects:
        state = "is incomplete (its push never finished)" if MARKER_KEY in objects else "is empty"
        raise LmiCompileError(f"{u}: the hand-over of the {stage} stage {state}; rerun the batch to redo it")
    expect = manifest_objects(client, u)  # every byte below is checked against the push's checksums
    dest = Path(work.root) / IN_DIR
    small = [k for k in objects if k == RECORDS or k.startswith(f"{MODEL}/")]
    download_files(client, u, small, dest, objects, desc="handover: model files", expect=expect, mtimes=mtimes)
    info = json.loads((dest / RECORDS).read_text())
    record = info["record"]
    if record.get("stage") != stage:
        raise LmiCompileError(f"{u}: hands over the {record.get('stage')} stage, not {stage}; rerun the batch")
    model_root = dest / MODEL
    if info.get("fetch"):  # what the source resolved to (a Hub commit), for the layout's manifest
        stages.write_json_atomic(model_root / stages.STAGE_RECORD, info["fetch"])
    facts = {k: v for k, v in record.items() if k not in ("stage", "fingerprint", "tool_version", "finished_at")}

    def install(staging: Path) -> dict:
        rels = [k for k in objects if k.startswith(f"{stage}/")]
        download_files(client, u, rels, dest, objects, desc=f"handover: {stage}", expect=expect, mtimes=mtimes)
        for rel in rels:
            place(dest / rel, staging / rel[len(stage) + 1:])
        shutil.rmtree(dest / stage, ignore_errors=True)  # the stage folder holds the same files (hard links)
        return {**facts, "handed_over_from": str(u)}

    # Done already (a rerun on this node) when the folder holds this fingerprint: nothing is downloaded.
    stages.run(final, stage, record["fingerprint"], install)
    model = ValidatedModel(model_root, ModelConfig.load(model_root / "config.json"), checkpoint=None, custom_code=[])
    return model, Path(final), record["fingerprint"]
