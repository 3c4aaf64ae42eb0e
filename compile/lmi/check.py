"""`lmi-compile check`: which LMI loading path a model location fits, and what stops it loading.

It reads listings and small files only (configs, indexes, manifests), never weights, for a local folder
or an S3 prefix, and applies the rules LMI applies (shared/spec formats.md sections 3 and 4).
"""

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from lmi_compile.errors import STANDIN_MARK, BadInput
from lmi_compile.lmi.properties import parse as parse_properties
from lmi_compile.lmi.targets import resolve as resolve_target
from lmi_compile.remote.manifest import LAYOUT_MANIFEST, MANIFEST_KEY, MARKER_KEY, unmatched_objects

LAYOUT_NAMES = {
    "trtllm-triton": "TensorRT-LLM triton repository (LMI up to 0.32)",
    "trtllm-engine-dir": "TensorRT-LLM engine directory (LMI 0.33+)",
    "neuron-optimum": "Neuron optimum layout (checkpoint/ + compiled/)",
    "neuron-split": "Neuron split model + compiled graph",
    "hf-pretrained": "HuggingFace pretrained (compiled just in time at startup)",
    "trtllm-checkpoint": "TensorRT-LLM checkpoint (rank files; not loadable until trtllm-build makes engines)",
}
NEURON_KEYS = ("task", "batch_size", "num_cores", "auto_cast_type", "sequence_length", "compiler_type",
               "compiler_version", "checkpoint_id", "checkpoint_revision")


class Location:
    """A folder or an S3 prefix: relative file names with sizes, and small reads."""

    def __init__(self, text: str):
        self.text = text
        if text.startswith("s3://"):
            from lmi_compile.remote.s3 import list_objects, make_client, parse_s3_uri

            self.uri = parse_s3_uri(text)
            self.client = make_client()
            self.files = list_objects(self.client, self.uri)
            self.root = None
        else:
            self.uri, self.root = None, Path(text)
            if not self.root.is_dir():
                raise BadInput(f"{text}: no such folder; give a local folder or an s3:// prefix")
            self.files = {p.relative_to(self.root).as_posix(): p.stat().st_size
                          for p in self.root.rglob("*") if p.is_file()}

    def read(self, rel: str) -> bytes:
        if self.root is not None:
            return (self.root / rel).read_bytes()
        from lmi_compile.remote.s3 import translate

        try:
            return self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key(rel))["Body"].read()
        except Exception as e:
            raise translate(e, f"{self.uri}{rel}") from None

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """A byte range of one file: headers are read this way, never whole weight files."""
        if length <= 0:
            return b""
        if self.root is not None:
            with open(self.root / rel, "rb") as f:
                f.seek(offset)
                return f.read(length)
        from lmi_compile.remote.s3 import translate

        try:
            return self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key(rel),
                                          Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()
        except Exception as e:
            raise translate(e, f"{self.uri}{rel}") from None

    def json(self, rel: str, problems: list) -> dict | None:
        if rel not in self.files:
            return None
        try:
            data = json.loads(self.read(rel))
            return data if isinstance(data, dict) else None
        except ValueError:
            problems.append(f"{rel}: not valid JSON")
            return None

    def model_id(self) -> str:
        return str(self.uri) if self.uri else str(self.root.resolve())


# serving.properties values a user may change without recompiling: where the artifact lives, remote code, where the
# split layout's graphs are in the container
USER_OPTIONS = ("option.model_id", "option.trust_remote_code", "option.compiled_graph_path")


def seal_layout(folder: Path) -> None:
    """Record in a laid-out tree's lmi-compile.json what `check` holds the tree to later, here or on S3: every file
    with its size (serving.properties aside: users add options to it), and the serving.properties values the
    engines or graphs were compiled for."""
    path = folder / LAYOUT_MANIFEST
    manifest = json.loads(path.read_text())
    props = folder / "serving.properties"
    options = parse_properties(props.read_bytes(), "serving.properties") if props.is_file() else {}
    manifest["serving_options"] = {k: v for k, v in options.items() if k not in USER_OPTIONS}
    manifest["files"] = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                         and p.name not in (LAYOUT_MANIFEST, "serving.properties")}
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _check_sealed(loc: "Location", report: "Report") -> None:
    """The tree against what its lmi-compile.json recorded when it was laid out (seal_layout)."""
    manifest = loc.json(LAYOUT_MANIFEST, report.problems) or {}
    files = manifest.get("files")
    if isinstance(files, dict):
        bad = [rel for rel, size in files.items() if loc.files.get(rel) != size]
        if bad:
            report.problems.append(f"{bad[0]}: missing, or another size than lmi-compile laid out ({len(bad)} such "
                                   f"file(s)); restore the tree or lay it out again")
    for key, value in (manifest.get("serving_options") or {}).items():
        have = report.properties.get(key)
        if have is not None and have != value:
            report.problems.append(f"serving.properties: {key}={have}, but the artifact was compiled for "
                                   f"{key}={value}; set it back, or compile again with that setting")


@dataclass
class Report:
    location: str
    layout: str | None
    loadable: bool
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    upload_complete: bool | None = None
    versions: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    quantization: dict | None = None  # TensorRT-LLM engines: the engine config's pretrained_config.quantization


def _ranks(files: dict, folder: str) -> set[int]:
    pre = f"{folder}/" if folder else ""
    out = set()
    for rel in files:
        m = re.fullmatch(re.escape(pre) + r"rank(\d+)\.engine", rel)
        if m:
            out.add(int(m.group(1)))
    return out


def _check_engines(loc: Location, folder: str, report: Report, container: str | None) -> None:
    pre = f"{folder}/" if folder else ""
    cfg = loc.json(f"{pre}config.json", report.problems)
    if not cfg or "build_config" not in cfg:
        report.problems.append(f"{pre}config.json: missing or without build_config (not a trtllm-build output)")
        return
    mapping = cfg.get("pretrained_config", {}).get("mapping", {})
    world = mapping.get("world_size") or mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
    have = _ranks(loc.files, folder)
    missing = sorted(set(range(world)) - have)
    if missing:
        report.problems.append(f"{pre}: engine config says {world} ranks but rank{missing[0]}.engine"
                               f"{' and others are' if len(missing) > 1 else ' is'} missing")
    extra = sorted(have - set(range(world)))
    if extra:
        report.problems.append(f"{pre}: rank{extra[0]}.engine is beyond the engine config's {world} ranks")
    q = cfg.get("pretrained_config", {}).get("quantization") or {}
    report.quantization = {k: q.get(k) for k in ("quant_algo", "kv_cache_quant_algo")}
    # TensorRT-LLM 0.9 runs these plugins in float16 unless trtllm-build names a dtype (plugin/plugin.py at v0.9.0)
    dtype = cfg.get("pretrained_config", {}).get("dtype")
    plugins = cfg["build_config"].get("plugin_config") or {}
    for name in ("gpt_attention_plugin", "moe_plugin", "gemm_plugin"):
        have = plugins.get(name)
        if dtype in ("float16", "bfloat16") and have in ("float16", "bfloat16", "float32") and have != dtype:
            report.notes.append(f"{pre}config.json: {name} runs in {have} on a {dtype} model (trtllm-build "
                                f"--{name} {dtype} builds it in the model's dtype)")
    version = str(cfg.get("version", "unknown"))
    report.versions["tensorrt_llm"] = version
    if STANDIN_MARK in version:
        report.problems.append(f"{pre}config.json: engines were made by a stand-in trtllm-build; they are "
                               f"placeholders, not compiled engines")
    if STANDIN_MARK in str(cfg.get("pretrained_config", {}).get("lmi_compile_standin", "")):
        report.problems.append(f"{pre}config.json: the checkpoint was written by a stand-in convert_checkpoint.py; "
                               f"its weights are placeholders, not a conversion")
    if container and version != container:
        report.problems.append(f"engines were built with TensorRT-LLM {version}, the container has {container}: "
                               f"rebuild them in the serving container")
    report.properties.setdefault("option.tensor_parallel_degree", str(mapping.get("tp_size", world)))
    report.properties.setdefault("option.rolling_batch", "trtllm")


def _check_split(loc: Location, folder: str, report: Report) -> None:
    pre = f"{folder}/" if folder else ""
    k2f = loc.json(f"{pre}pytorch_model.bin/key_to_filename.json", report.problems)
    if k2f is None:
        report.problems.append(f"{pre}pytorch_model.bin/key_to_filename.json: missing")
        return
    missing = [f for f in k2f.values() if f"{pre}pytorch_model.bin/{f}" not in loc.files]
    if missing:
        report.problems.append(f"{pre}pytorch_model.bin/: {len(missing)} tensor file(s) named by "
                               f"key_to_filename.json are missing (e.g. {missing[0]})")
    if "lm_head.weight" not in k2f:
        report.problems.append(f"{pre}pytorch_model.bin/key_to_filename.json: no lm_head.weight (write it even "
                               f"when tied)")


def _check_neffs(loc: Location, report: Report, container: str | None, version: str | None) -> None:
    if not [f for f in loc.files if re.fullmatch(r"compiled/[^/]+\.neff", f)]:
        report.problems.append("compiled/: no .neff graphs")
    if version is not None:
        report.versions["neuronx_cc"] = version
        if STANDIN_MARK in str(version):
            report.problems.append("compiled graphs were made by a stand-in compiler; they are placeholders")
        if container and str(version) != container:
            report.problems.append(f"graphs were compiled with neuronx-cc {version}, the container has {container}: "
                                   f"recompile in the serving container")


def _check_hf(loc: Location, report: Report) -> None:
    from lmi_compile.model.files import preferred_index, small_files, weight_files

    try:
        small_files(loc.files, trust_remote_code=True, source=loc.text)
        name = preferred_index(loc.files)
        index = loc.json(name, report.problems) if name else None
        weights = weight_files(loc.files, index, name, source=loc.text)
    except BadInput as e:
        report.problems.append(str(e).removeprefix(f"{loc.text}: ").removeprefix(f"{loc.text}/"))
        return
    if any(f.endswith(".py") and "/" not in f for f in loc.files):
        report.notes.append("custom code present: deploy with option.trust_remote_code=true")
    _check_weights_readable(loc, weights, report)


def _check_weights_readable(loc: Location, weights: list[str], report: Report) -> None:
    """What LMI's loader would trip on, at the cost of headers: safetensors headers that do not fit their file,
    and (local folders) pickles that a weights_only load refuses. Never reads tensor data."""
    from lmi_compile.model.checkpoint import check_safetensors_header, load_pickle, parse_raw_header

    for rel in weights:
        try:
            if rel.endswith(".safetensors"):
                header, size, n = parse_raw_header(lambda off, ln: loc.read_range(rel, off, ln), loc.files[rel], rel)
                check_safetensors_header(header, size, n, rel)
            elif loc.root is not None:
                load_pickle(loc.root / rel)  # weights_only and mmapped: the pickle is read, the tensors are not
            else:
                report.notes.append(f"{rel}: PyTorch pickles on S3 are not inspected (it would mean a download); "
                                    f"LMI loads them with weights_only")
        except BadInput as e:
            report.problems.append(str(e).removeprefix(f"{loc.root}/" if loc.root else ""))


def detect(loc: Location) -> tuple[str | None, str]:
    """(layout, folder) by LMI's own rules."""
    top = {f for f in loc.files if "/" not in f}
    for d in sorted({PurePosixPath(f).parts[0] for f in loc.files if "/" in f}):
        if f"{d}/config.pbtxt" in loc.files and f"{d}/tokenizer_config.json" in loc.files:
            return "trtllm-triton", d
    cfg = loc.json("config.json", []) if "config.json" in top else None
    if cfg and "build_config" in cfg:
        return "trtllm-engine-dir", ""
    if cfg and "neuron" in cfg and not any(f.endswith(".safetensors") for f in top):
        return "neuron-optimum", ""
    if "pytorch_model.bin/key_to_filename.json" in loc.files:
        return "neuron-split", ""
    if cfg and "mapping" in cfg and "architecture" in cfg and any(re.fullmatch(r"rank\d+\.safetensors", f)
                                                                  for f in top):
        return "trtllm-checkpoint", ""
    if cfg is not None:
        return "hf-pretrained", ""
    return None, ""


def check(text: str, *, container_trtllm: str | None = None, container_neuronx_cc: str | None = None,
          lmi_version: str | None = None) -> Report:
    """Report on `text` (a folder or S3 prefix); with `lmi_version`, also whether that LMI release loads it."""

    loc = Location(text)
    report = Report(location=text, layout=None, loadable=False)
    if not loc.files:
        report.problems.append("empty: no files at this location")
        return report
    if loc.uri is not None:
        manifest = loc.json(MANIFEST_KEY, report.problems)
        if MARKER_KEY in loc.files and manifest is None:
            report.upload_complete = False
            report.problems.append("incomplete upload: an lmi-compile push started here and never wrote its manifest")
        elif manifest is not None:
            objects = manifest.get("objects")
            objects = {k: v for k, v in objects.items() if isinstance(v, dict)} if isinstance(objects, dict) else {}
            bad = unmatched_objects(loc.client, loc.uri, objects)  # HEADs: sizes and S3's stored checksums
            report.upload_complete = not bad
            if bad:
                rel, why = next(iter(bad.items()))
                report.problems.append(f"upload manifest lists {len(bad)} object(s) missing, or changed since the "
                                       f"push (e.g. {rel}: {why}); push the folder again")
    props_rel = "serving.properties"
    if props_rel in loc.files:
        report.properties.update(parse_properties(loc.read(props_rel), props_rel))
    if LAYOUT_MANIFEST in loc.files:
        _check_sealed(loc, report)
    layout, folder = detect(loc)
    report.layout = layout
    if layout is None:
        report.problems.append("no LMI layout recognized: no config.json, no <dir>/config.pbtxt with "
                               "tokenizer_config.json, no pytorch_model.bin/ split directory")
    elif layout == "trtllm-triton":
        _check_engines(loc, f"{folder}/1", report, container_trtllm)
        pbtxt = loc.read(f"{folder}/config.pbtxt").decode("utf-8", "replace")
        if "${" in pbtxt:
            report.problems.append(f"{folder}/config.pbtxt: unfilled template fields ({re.findall(r'[$][{][^}]+[}]', pbtxt)[0]})")
        if 'backend: "tensorrtllm"' not in pbtxt:
            report.problems.append(f"{folder}/config.pbtxt: backend is not tensorrtllm")
        m = re.search(r'key: "gpt_model_path"\s*value: \{\s*string_value: "([^"]*)"', pbtxt)
        if m:
            report.notes.append(f"config.pbtxt gpt_model_path = {m.group(1)} (must be where the engines are in "
                                f"the container)")
        if f"{folder}/config.json" not in loc.files:
            report.problems.append(f"{folder}/config.json: the HuggingFace config is missing")
        report.notes.append(f"option.model_id is this prefix, the one ABOVE {folder}/")
    elif layout == "trtllm-engine-dir":
        _check_engines(loc, "", report, container_trtllm)
        if "tokenizer_config.json" not in loc.files:
            report.problems.append("tokenizer_config.json: missing")
    elif layout == "neuron-optimum":
        neuron = loc.json("config.json", report.problems).get("neuron", {})
        missing = [k for k in NEURON_KEYS if k not in neuron]
        if missing:
            report.problems.append(f"config.json: the neuron section lacks {', '.join(missing)}")
        if "tokenizer_config.json" not in loc.files:
            report.problems.append("tokenizer_config.json: missing")
        presharded = "compiled/config.json" in loc.files  # LMI 0.30+: weights in compiled/ (neuron/check.py)
        if not presharded and "checkpoint/config.json" not in loc.files:
            report.problems.append("checkpoint/config.json: missing")
        if "checkpoint/pytorch_model.bin/key_to_filename.json" in loc.files:
            _check_split(loc, "checkpoint", report)
        elif not presharded and not any(f.startswith("checkpoint/") and f.endswith(".safetensors") for f in loc.files):
            report.problems.append("checkpoint/: no split weights and no safetensors")
        _check_neffs(loc, report, container_neuronx_cc, neuron.get("compiler_version"))
        for key, opt in (("num_cores", "tensor_parallel_degree"), ("sequence_length", "n_positions"),
                         ("batch_size", "max_rolling_batch_size")):
            want, have = str(neuron.get(key)), report.properties.get(f"option.{opt}")
            if have is not None and have != want:
                report.problems.append(f"serving.properties: option.{opt}={have} but the graphs were compiled "
                                       f"with {key}={want}")
    elif layout == "neuron-split":
        _check_split(loc, "", report)
        manifest = loc.json(LAYOUT_MANIFEST, []) or {}
        version = (manifest.get("versions") or {}).get("neuronx_cc")
        graph = report.properties.get("option.compiled_graph_path")
        if graph is None:
            report.problems.append("serving.properties: option.compiled_graph_path is not set")
        elif not (graph.startswith("s3://") or graph.startswith("/")):
            report.problems.append(f"option.compiled_graph_path={graph} is relative: LMI resolves it against its "
                                   f"working directory; use an absolute path or an s3:// URI")
        if report.properties.get("option.load_split_model") != "true":
            report.problems.append("serving.properties: set option.load_split_model=true")
        _check_neffs(loc, report, container_neuronx_cc, version)
    elif layout == "trtllm-checkpoint":
        report.problems.append("a TensorRT-LLM checkpoint holds rank files, not engines: build them with "
                               "`lmi-compile trtllm` (or trtllm-build) and deploy the laid-out output")
    else:
        _check_hf(loc, report)
    if lmi_version and layout in ("trtllm-triton", "trtllm-engine-dir"):
        from lmi_compile.trtllm.check import check_trtllm_target

        check_trtllm_target(loc, folder, report, resolve_target("trtllm", lmi_version))
    elif lmi_version and layout in ("neuron-optimum", "neuron-split"):
        from lmi_compile.neuron.check import check_neuron_target

        check_neuron_target(loc, report, resolve_target("neuron", lmi_version))
    if layout is not None:
        report.properties.setdefault("option.model_id", loc.model_id())
    report.loadable = not report.problems
    return report


def render(r: Report) -> str:
    head = f"{r.location}: {LAYOUT_NAMES.get(r.layout, 'unrecognized')}: " + \
        ("loadable" if r.loadable else "NOT loadable")
    lines = [head]
    if r.upload_complete is not None:
        lines.append(f"  upload: {'complete (manifest verified)' if r.upload_complete else 'INCOMPLETE'}")
    for k, v in r.versions.items():
        lines.append(f"  {k}: {v}")
    if r.quantization is not None:
        q = r.quantization
        lines.append(f"  quantization: weights {q.get('quant_algo') or 'unquantized'}, KV cache "
                     f"{q.get('kv_cache_quant_algo') or 'unquantized'}")
    lines += [f"  problem: {p}" for p in r.problems]
    lines += [f"  note: {n}" for n in r.notes]
    if r.properties:
        lines.append("  deploy with:")
        lines += [f"    {k}={v}" for k, v in r.properties.items()]
    return "\n".join(lines)


def as_json(r: Report) -> str:
    return json.dumps(asdict(r), indent=2)
