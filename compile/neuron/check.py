"""`check --lmi-version` for Neuron layouts: would this release's loader find the graphs?

lmi/check.py recognizes the layout and checks its files; this adds what depends on the target release
(configs/targets.json "neuron"): the architecture and layout it loads, the tree it reads the optimum layout
from, how it treats option.compiled_graph_path, dtype against the graphs' auto_cast_type, the toolchain.
"""

from lmi_compile.errors import STANDIN_MARK
from lmi_compile.neuron.calls import LMI_TO_AMP
from lmi_compile.remote.manifest import LAYOUT_MANIFEST

LAYOUTS = {"neuron-optimum": "optimum", "neuron-split": "split"}


def check_neuron_target(loc, report, target) -> None:
    """Append to `report.problems` what stops `target` (a neuron Target) loading the graphs at `loc`."""
    layout = LAYOUTS.get(report.layout)
    if layout is None:
        return
    problems, opts = report.problems, report.properties
    cfg = loc.json("config.json", []) or {}
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in target["architectures"]:
        why = target.get("not_loaded", {}).get(arch, "its Neuron loader has no class for it")
        problems.append(f"config.json: architecture {arch} cannot be served by {target.describe()}: {why}")
    if layout not in target["layouts"]:
        problems.append(f"{target.describe()} does not load the Neuron {layout} layout; recompile with "
                        f"--format {' or '.join(target['layouts'])}")
    if layout == "optimum":
        compiled = {f for f in loc.files if f.startswith("compiled/")}
        if target["optimum_tree"] == "presharded":
            if "compiled/config.json" not in compiled:
                problems.append(f"compiled/config.json: missing; {target.describe()} calls "
                                f"from_pretrained(<root>/compiled), which needs the config save(dir, "
                                f"sharded_weights=True) writes; recompile with --lmi-version {target.release}")
            if not any(f.endswith(".safetensors") for f in compiled):
                problems.append(f"compiled/: no presharded weights (*.safetensors); {target.describe()} builds the "
                                f"model from compiled/, not checkpoint/; recompile with --lmi-version {target.release}")
            if opts.get("option.on_device_embedding", "true").lower() != "true":
                problems.append("option.on_device_embedding=false: presharded weights need on-device embedding")
        elif not any(f.startswith("checkpoint/") for f in loc.files):
            problems.append(f"checkpoint/: missing; {target.describe()} builds the model from checkpoint/ "
                            f"(compiled/ with presharded weights is the LMI 0.30+ tree)")
        cast = (cfg.get("neuron") or {}).get("auto_cast_type")
        dtype = opts.get("option.dtype", target["dtype_default"])
        if cast and dtype != cast:
            problems.append(f"serving.properties: option.dtype={dtype} but the graphs were compiled with "
                            f"auto_cast_type {cast}; LMI passes amp={LMI_TO_AMP.get(dtype, dtype)} and misses them")
    else:
        graph = opts.get("option.compiled_graph_path")
        if graph and graph.startswith("s3://"):
            problems.append(f"option.compiled_graph_path={graph}: LMI never loads graphs from S3 (0.26 ignores it, "
                            f"0.27 fails, 0.28+ skip it and recompile); use a local absolute path or the optimum "
                            f"layout")
        elif graph and not graph.startswith("/") and not any(graph in p for p in problems):
            # tnx_properties.py compiled_path_validator (v0.26.0-0.34.0-dlc): a local path that is not a folder in
            # LMI's working directory stops the model; model_loader.py looks again after os.chdir('/tmp')
            problems.append(f"option.compiled_graph_path={graph} is relative: LMI fails to start unless that folder "
                            f"is in its working directory, and then looks for it again under /tmp; use an absolute "
                            f"path")
    manifest = loc.json(LAYOUT_MANIFEST, []) or {}
    built_for = manifest.get("lmi_version")
    if built_for and built_for != target.release:
        problems.append(f"{LAYOUT_MANIFEST}: compiled for LMI {built_for}, not {target.release}: the loaders build "
                        f"different models; recompile with --lmi-version {target.release}")
    versions = manifest.get("versions") or {}
    for key in ("transformers_neuronx", "neuronx_cc"):
        have = versions.get(key)
        if have and STANDIN_MARK not in str(have) and str(have).split("+")[0] != target[key]:
            problems.append(f"graphs were made with {key.replace('_', '-')} {have}; {target.describe()} has "
                            f"{target[key]}: recompile in that container")
    for key in ("rolling_batch", "n_positions", "tensor_parallel_degree", "max_rolling_batch_size", "dtype"):
        if f"option.{key}" not in opts:
            report.notes.append(f"option.{key} is not set: {target.describe()} then picks its own default, which "
                                f"may not be what the graphs were compiled with")
