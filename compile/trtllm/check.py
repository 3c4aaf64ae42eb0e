"""`check --lmi-version` for TensorRT-LLM layouts: would this release load the engines?

lmi/check.py recognizes the layout and checks its files; this adds what depends on the target release
(configs/targets.json "trtllm").
"""


def check_trtllm_target(loc, folder: str, report, target) -> None:
    """Append to `report.problems` what stops `target` (a trtllm Target) loading the tree at `loc`: its layout,
    engine version, architecture name and serving.properties, by that release's row of the target table."""
    from lmi_compile.lmi.check import LAYOUT_NAMES

    layout, lmi_version = report.layout, target.release
    tool = target["tool"]
    want = f"trtllm-{target['layout']}"
    if layout != want:
        report.problems.append(f"{target.describe()} loads the {LAYOUT_NAMES[want]}, not the {LAYOUT_NAMES[layout]}")
    engine_dir = f"{folder}/1" if layout == "trtllm-triton" else ""
    cfg = loc.json(f"{engine_dir}/config.json" if engine_dir else "config.json", []) or {}
    version = str(cfg.get("version", "unknown")).split("+")[0]
    if version != tool["version"]:
        report.problems.append(f"engines were built with TensorRT-LLM {version}; {target.describe()} runs "
                               f"{tool['version']}: rebuild with --lmi-version {lmi_version}")
    name = (cfg.get("pretrained_config") or {}).get("architecture")
    known = {e["name"] for e in tool["architectures"].values() if "name" in e}
    if name and name not in known:
        report.problems.append(f"architecture {name} is not one TensorRT-LLM {tool['version']} knows "
                               f"({', '.join(sorted(known))})")
    q, facts = report.quantization or {}, tool.get("quantization", {})
    for key, allowed in (("quant_algo", "quant_algos"), ("kv_cache_quant_algo", "kv_cache_quant_algos")):
        if q.get(key) and q[key] not in facts.get(allowed, ()):
            report.problems.append(f"{key} {q[key]} is not one TensorRT-LLM {tool['version']} has")
    props, spec = report.properties, target["properties"]
    if props:
        if props.get("engine") != spec["engine"]:
            report.problems.append(f"serving.properties: engine={props.get('engine')}; {target.describe()} "
                                   f"needs engine={spec['engine']}")
        for key, value in spec["fixed"].items():
            have = props.get(f"option.{key}")
            if have is not None and have.lower() != str(value).lower():
                report.problems.append(f"serving.properties: option.{key}={have}; {target.describe()} needs {value}")
        for option in ("max_input_len", "max_output_len", "max_seq_len"):
            if f"option.{option}" in props and option not in spec["lengths"]:
                report.problems.append(f"serving.properties: option.{option} is ignored by {target.describe()}; "
                                       f"it reads {', '.join('option.' + o for o in spec['lengths'])}")
