"""The second TensorRT-LLM compiler boundary: its own examples/llama/convert_checkpoint.py, for 4-bit GPTQ and AutoAWQ
checkpoints.

TensorRT-LLM packs 4-bit weights for its mixed-GEMM kernels with a C++ op whose layout depends on the GPU
architecture and the version (torch.ops.trtllm.preprocess_weights_for_mixed_gemm, models/modeling_utils.py
preprocess_weights), so lmi-compile does not write them: it runs that version's script, with the flags that version
accepts (configs/targets.json toolchains -> convert_checkpoint, read at each tag), and checks what it wrote. The
script is not a command in the LMI containers: LMI 0.28-0.32 convert through the closed tensorrt_llm_toolkit wheel
and 0.33+ install tensorrt_llm from pip, neither with examples/ (deepjavalibrary/djl-serving
serving/docker/tensorrt-llm.Dockerfile at each release). So the user names it: --trtllm-convert-script PATH.
"""

import json
import logging
import sys
from pathlib import Path

from lmi_compile.errors import STANDIN_MARK, BadInput, LmiCompileError
from lmi_compile.pipeline.tool import quoted, run_watched

log = logging.getLogger("lmi_compile")


def facts(target) -> dict:
    """The target's convert_checkpoint row ({} where none was read)."""
    return target["tool"].get("convert_checkpoint", {})


def check_scheme(target, config, quant, first_release) -> None:
    """Refuse a 4-bit scheme or family the target's convert_checkpoint.py does not read, naming the first release
    whose does (`first_release(label, serves)` as the backend words it)."""
    f, version, arch = facts(target), target["tool"]["version"], config.architecture
    if quant.external not in f.get("schemes", {}):
        name = {"gptq": "GPTQ", "awq": "AutoAWQ"}[quant.external]
        why = ("its examples/llama/convert_checkpoint.py reads no AutoAWQ checkpoint (AWQ only through "
               "examples/quantization/quantize.py from the unquantized model)" if quant.external == "awq" else
               "its convert_checkpoint.py reads no GPTQ checkpoint")
        raise BadInput(f"{config.path}: 4-bit {name} cannot be converted for {target.describe()}: TensorRT-LLM "
                       f"{version}: {why}; "
                       f"{first_release(name, lambda t: quant.external in _schemes(t))}")
    if arch not in f.get("families", ()):
        raise BadInput(f"{config.path}: 4-bit {arch} is not converted: lmi-compile runs TensorRT-LLM's "
                       f"{f['script']} for {', '.join(f['families'])} only; convert it with that family's "
                       f"convert_checkpoint.py yourself, or from the unquantized model")


def _schemes(tool: dict) -> dict:
    return tool.get("convert_checkpoint", {}).get("schemes", {})


def find_script(path: str | None, target, quant) -> Path:
    """The convert_checkpoint.py to run, checked before any download."""
    f, version = facts(target), target["tool"]["version"]
    fetch = (f"inside the target LMI container ({target['container']}): git clone --depth 1 -b v{version} "
             f"https://github.com/NVIDIA/TensorRT-LLM, then pass --trtllm-convert-script "
             f"TensorRT-LLM/{f['script']} (the container's tensorrt_llm runs it)")
    if not path:
        raise BadInput(f"{quant.where}: 4-bit {quant.source} is converted by TensorRT-LLM {version}'s own "
                       f"{f['script']}, which the LMI container does not ship as a command; {fetch}")
    script = Path(path).expanduser().absolute()
    if not script.is_file():
        raise BadInput(f"--trtllm-convert-script {path}: no such file; {fetch}")
    return script


def is_standin(script: Path) -> bool:
    return STANDIN_MARK in script.name


def command(script: Path, target, quant, model_root: Path, out: Path, *, tp: int, pp: int, dtype: str, workers: int,
            weight_files: list[str]) -> list[str]:
    """The script's command line from the target's row: common flags, then the scheme's."""
    f = facts(target)
    scheme = f["schemes"][quant.external]
    if scheme.get("one_weights_file") and len(weight_files) != 1:
        raise BadInput(f"{model_root}: TensorRT-LLM {target['tool']['version']}'s convert_checkpoint.py reads a GPTQ "
                       f"model from one safetensors file ({[a for a in scheme['args'] if a.startswith('--')][-1]}), "
                       f"this one has {len(weight_files)}; merge its shards into model.safetensors")
    values = {"model": str(model_root), "output": str(out), "tp": str(tp), "pp": str(pp), "dtype": dtype,
              "workers": str(workers), "group_size": str(quant.group_size),
              "weights_file": str(model_root / weight_files[0]) if weight_files else ""}
    return [sys.executable, str(script)] + [a.format(**values) for a in f["args"] + scheme["args"]]


def run(cmd: list[str], out: Path, world: int, log_path: Path) -> None:
    """Run the script, its output in log_path; progress follows the rank files it writes."""
    log.info("convert: %s", quoted(cmd))
    code, tail = run_watched(cmd, cwd=out, log_path=log_path, total=world, desc="convert_checkpoint.py", unit="rank",
                             pattern="rank*.safetensors", poll_s=0.2)
    if code != 0:
        raise LmiCompileError(f"convert_checkpoint.py failed with exit code {code}; see {log_path}: {tail}")


def check_output(out: Path, world: int, log_path: Path) -> dict:
    """What the script must have written: config.json with a 4-bit quant_algo and a rank file per rank."""
    from lmi_compile.model.checkpoint import read_safetensors_header

    cfg_path = out / "config.json"
    missing = [f"rank{r}.safetensors" for r in range(world) if not (out / f"rank{r}.safetensors").is_file()]
    if missing or not cfg_path.is_file():
        raise LmiCompileError(f"{out}: convert_checkpoint.py exited 0 but wrote no "
                              f"{', '.join(missing) or 'config.json'}; see {log_path}")
    cfg = json.loads(cfg_path.read_text())
    algo = (cfg.get("quantization") or {}).get("quant_algo")
    if algo not in ("W4A16_GPTQ", "W4A16_AWQ"):
        raise LmiCompileError(f"{cfg_path}: quant_algo {algo!r}, not a 4-bit one: the script did not read the "
                              f"checkpoint as 4-bit; see {log_path}")
    if (cfg.get("mapping") or {}).get("world_size", world) != world:
        raise LmiCompileError(f"{cfg_path}: world_size {cfg['mapping'].get('world_size')}, expected {world}")
    for r in range(world):
        read_safetensors_header(out / f"rank{r}.safetensors")
    if STANDIN_MARK in str(cfg.get("lmi_compile_standin", "")):
        log.warning("convert: the checkpoint came from a STAND-IN convert_checkpoint.py: placeholder weights, not a "
                    "conversion")
    return cfg
