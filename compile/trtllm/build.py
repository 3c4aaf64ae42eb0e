"""The TensorRT-LLM compiler boundary: running the `trtllm-build` executable.

This is the only place lmi-compile touches TensorRT-LLM. It needs TensorRT-LLM on a host with an NVIDIA
GPU of the architecture the endpoint will use (engines run only on that GPU architecture and that
TensorRT-LLM version), e.g. inside the LMI TensorRT-LLM container.
"""

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile.errors import STANDIN_MARK, LmiCompileError
from lmi_compile.pipeline.tool import quoted, run_watched
from lmi_compile.pipeline.workdir import RUN_ONLY

log = logging.getLogger("lmi_compile")

INSTALL_HINT = ("run inside the LMI TensorRT-LLM container (deepjavalibrary/djl-serving:*-tensorrt-llm), or "
                "pip install 'lmi-compile[trtllm]' on a CUDA host, or pass --trtllm-build PATH")
# Flags lmi-compile sets itself; a pass-through may not override them.
MANAGED_FLAGS = {"--checkpoint_dir", "--output_dir", "--output_timing_cache", "--workers", "--max_batch_size",
                 "--max_input_len", "--max_seq_len", "--max_output_len", "--max_num_tokens", "--gemm_plugin"}


@dataclass(frozen=True)
class BuildOptions:
    """Engine limits. Their defaults are LMI's for the target release (configs/targets.json `defaults`),
    picked by the CLI; a dataclass default here would be a second home for them."""

    max_batch_size: int
    max_input_len: int
    max_output_len: int | None = None  # output tokens; None: max_seq_len, else the model's length
    max_seq_len: int | None = None  # prompt plus output; default max_input_len + max_output_len
    max_num_tokens: int | None = None
    gemm_plugin: str = "auto"
    workers: int | None = field(default=None, metadata=RUN_ONLY)  # default: min(visible GPUs, ranks)
    extra_args: tuple[str, ...] = field(default=(), metadata={"flag": "--trtllm-build-args"})

    @property
    def seq_len(self) -> int | None:
        """Prompt plus output, when the options fix it (else the backend takes the model's length)."""
        if self.max_seq_len:
            return self.max_seq_len
        return self.max_input_len + self.max_output_len if self.max_output_len else None


@dataclass
class Toolchain:
    executable: Path
    gpus: list[dict] = field(default_factory=list)
    help_flags: frozenset[str] = frozenset()

    def facts(self) -> dict:
        return {"trtllm_build": str(self.executable), "gpus": self.gpus}


def find_trtllm_build(explicit: str | None) -> Toolchain:
    """Pre-flight: the executable exists and answers --help (its flags tell which TensorRT-LLM it is);
    GPUs read with nvidia-smi where present."""
    exe = explicit or shutil.which("trtllm-build")
    if not exe or not Path(exe).is_file() or not os.access(exe, os.X_OK):
        where = f"{explicit} is not an executable file" if explicit else "trtllm-build is not on PATH"
        raise LmiCompileError(f"{where}; building engines needs TensorRT-LLM: {INSTALL_HINT}")
    exe = Path(os.path.abspath(exe))  # absolute, links kept: a versioned link names the tool it points to
    try:
        # Importing tensorrt_llm takes a while; --help needs no GPU.
        proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LmiCompileError(f"{exe} --help did not answer ({e}); is it TensorRT-LLM's trtllm-build? {INSTALL_HINT}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LmiCompileError(f"{exe} --help failed with exit code {proc.returncode}: {tail[0][:200]}; {INSTALL_HINT}")
    flags = frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", proc.stdout))
    return Toolchain(exe, read_gpus(), flags)


def interface_matches(flags: frozenset[str], tool: dict) -> bool:
    sig = tool["help_signature"]
    return set(sig.get("has", ())) <= flags and not set(sig.get("lacks", ())) & flags


def check_interface(found: Toolchain, target) -> None:
    """Refuse, before any conversion, a trtllm-build of another TensorRT-LLM than the target release ships:
    its engines would not load, and its flags are not the ones we would pass."""
    from lmi_compile.lmi.targets import releases_with, toolchains

    need = target["tool"]
    if interface_matches(found.help_flags, need):
        return
    looks = [v for v, tc in toolchains("trtllm").items() if interface_matches(found.help_flags, tc)]
    if looks:
        lmi = [r for v in looks for r in releases_with("trtllm", toolchain=v)]
        seems = f"looks like TensorRT-LLM {' or '.join(looks)} (LMI {', '.join(lmi) or 'none'})"
    else:
        seems = "matches no TensorRT-LLM version in the target table"
    raise LmiCompileError(f"{found.executable} {seems}, but --lmi-version {target.release} needs TensorRT-LLM "
                          f"{need['version']} ({target['container']}); run in that container or choose the "
                          f"matching --lmi-version", exit_code=2)


def read_gpus() -> list[dict]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "compute_capability": parts[1], "memory": parts[2], "driver": parts[3]})
    return gpus


# trtllm-build's flags whose values are paths (--lora_dir takes several; --visualize_network a folder from 1.0, a
# switch before, which no value follows) in the releases of the target table (tests/standins/trtllm_interfaces.json):
# trtllm-build runs in its output folder, so a relative one is made absolute against the user's current folder here
PATH_FLAGS = ("--model_config", "--build_config", "--model_cls_file", "--input_timing_cache", "--lora_dir",
              "--visualize_network")


def parse_extra_args(text: str | None) -> tuple[str, ...]:
    try:
        args = shlex.split(text or "")
    except ValueError as e:
        raise LmiCompileError(f"--trtllm-build-args {text!r}: {e}; quote it as you would in a shell",
                              exit_code=2) from None
    for a in args:
        if a.split("=")[0] in MANAGED_FLAGS:
            raise LmiCompileError(f"--trtllm-build-args: {a.split('=')[0]} is set by lmi-compile; use its own "
                                  f"option instead", exit_code=2)
    out, paths = [], 0  # paths: how many of the next values are paths
    for a in args:
        flag, eq, value = a.partition("=")
        if a.startswith("-"):
            paths = 0 if eq or flag not in PATH_FLAGS else len(args) if flag == "--lora_dir" else 1
            out.append(f"{flag}={os.path.abspath(os.path.expanduser(value))}" if eq and flag in PATH_FLAGS else a)
        elif paths:
            out.append(os.path.abspath(os.path.expanduser(a)))
            paths -= 1
        else:
            out.append(a)
    return tuple(out)


def build_command(tool: Toolchain, ckpt: Path, out: Path, opts: BuildOptions, world: int, facts: dict,
                  dtype: str) -> list[str]:
    """The trtllm-build command line in the target TensorRT-LLM's own flags (`facts`: its toolchain row)."""
    workers = opts.workers or max(1, min(len(tool.gpus) or 1, world))
    if facts["length_flag"] == "--max_output_len":  # 0.9 has no --max_seq_len: it adds input and output itself
        lengths = ["--max_output_len", str(opts.seq_len - opts.max_input_len)]
    else:
        lengths = ["--max_seq_len", str(opts.seq_len)]
    # 'auto' (the model's dtype) arrived in 0.11; older versions take the dtype by name.
    gemm = dtype if opts.gemm_plugin == "auto" and not facts["gemm_plugin_auto"] else opts.gemm_plugin
    # Plugins whose default is float16 whatever the model (0.9) run in the model's dtype only when named; a
    # dtype of the user's own in --trtllm-build-args is theirs to choose (serving.properties does not describe it).
    given = {a.partition("=")[0] for a in opts.extra_args}
    plugins = [x for flag in facts["dtype_plugins"]["flags"] if flag not in given for x in (flag, dtype)]
    return [str(tool.executable), "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
            "--max_batch_size", str(opts.max_batch_size), "--max_input_len", str(opts.max_input_len), *lengths,
            "--max_num_tokens", str(opts.max_num_tokens), "--gemm_plugin", gemm, *plugins, "--workers",
            str(min(workers, world)), "--output_timing_cache", str(out / "model.cache"), *opts.extra_args]


def build_engines(tool: Toolchain, ckpt: Path, out: Path, opts: BuildOptions, log_dir: Path, target) -> dict:
    """Run trtllm-build; show per-rank progress; check every rank engine, the engine config, and that the engines
    are of the target's TensorRT-LLM version."""
    cfg = json.loads((ckpt / "config.json").read_text())
    world = cfg["mapping"]["world_size"]
    # TensorRT-LLM 0.9 builds a missing rank file from dummy weights and exits 0
    # (tensorrt_llm/models/modeling_utils.py l.1013-1029 at v0.9.0): never hand it an incomplete checkpoint.
    missing = [f"rank{r}.safetensors" for r in range(world) if not (ckpt / f"rank{r}.safetensors").is_file()]
    if missing:
        raise LmiCompileError(f"{ckpt}: {', '.join(missing)} missing for world size {world}; rerun with --force")
    out.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "trtllm-build.log"
    cmd = build_command(tool, ckpt, out, opts, world, target["tool"], cfg["dtype"])
    log.info("build: %s", quoted(cmd))
    code, tail = run_watched(cmd, cwd=out, log_path=log_path, total=world, desc="build engines", unit="rank",
                             pattern="rank*.engine")
    if code != 0:
        raise LmiCompileError(f"trtllm-build failed with exit code {code}; see {log_path}: {tail}")
    missing = [f"rank{r}.engine" for r in range(world) if not (out / f"rank{r}.engine").is_file()]
    engine_cfg_path = out / "config.json"
    if missing or not engine_cfg_path.is_file():
        raise LmiCompileError(f"{out}: trtllm-build exited 0 but wrote no {', '.join(missing) or 'config.json'}; "
                              f"see {log_path}")
    engine_cfg = json.loads(engine_cfg_path.read_text())
    if "build_config" not in engine_cfg or "pretrained_config" not in engine_cfg:
        raise LmiCompileError(f"{engine_cfg_path}: lacks build_config/pretrained_config; not a trtllm-build output")
    version = str(engine_cfg.get("version", "unknown"))
    if version.split("+")[0] != target["tool"]["version"]:
        raise LmiCompileError(f"{engine_cfg_path}: engines report TensorRT-LLM {version}, but {target.describe()} "
                              f"loads only {target['tool']['version']}; nothing was laid out or pushed")
    if STANDIN_MARK in version:
        log.warning("build: engines came from a STAND-IN trtllm-build (%s): they are placeholders, not a "
                    "compiled model", version)
    return {"tensorrt_llm_version": version, "stand_in": STANDIN_MARK in version, "world_size": world,
            "lmi_version": target.release, "build_command": cmd[1:],
            "build_options": {"max_batch_size": opts.max_batch_size, "max_input_len": opts.max_input_len,
                              "max_seq_len": opts.seq_len, "max_num_tokens": opts.max_num_tokens,
                              "gemm_plugin": opts.gemm_plugin, "extra_args": list(opts.extra_args)},
            **tool.facts()}
