"""JOBS.yaml: read, merge defaults, and check every job against the real backend command before any work.

The keys a job may carry are the long option names of `lmi-compile trtllm` / `lmi-compile neuron` (with `_`
for `-`), read from the Typer command itself, so a new option is usable here the day it is added. Values are
checked by parsing the command line they become with that command's own parser (types, ranges, choices).
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.errors import BadInput

BACKENDS = ("trtllm", "neuron")
TOP_KEYS = ("jobs", "defaults")
JOB_KEYS = ("name", "backend", "model", "resources")
RESOURCE_KEYS = ("accelerator_type", "gpus", "neuron_cores", "memory_gb", "instance")
# Options the batch runner owns: it gives every job its own work folder on the node and runs every stage.
MANAGED = {"work_dir": "the batch runner gives each job its own work folder on the node it runs on",
           "until": "a batch job runs every stage",
           "handover_out": "the batch runner hands stages over between nodes through --staging",
           "handover_in": "the batch runner hands stages over between nodes through --staging"}
# Not part of what a job builds (so not of its fingerprint): secrets and how a rerun treats earlier output.
NOT_FINGERPRINTED = ("token", "overwrite", "force")


@dataclass(frozen=True)
class Option:
    key: str  # the JOBS.yaml key: the long option name without dashes, `_` for `-`
    flag: str  # the command-line flag
    is_flag: bool  # a switch (`key: true` adds the flag)


@dataclass
class Job:
    """One validated job: its backend command's arguments, and what its placement needs."""

    name: str
    backend: str
    model: str
    options: dict  # key -> value, as given (defaults merged)
    resources: dict
    argv: list[str] = field(default_factory=list)  # the backend command line, without MODEL
    source: str | None = None  # the model as the nodes reach it (a local folder's staged S3 prefix)

    @property
    def upload(self) -> str | None:
        return self.options.get("upload")

    def fingerprint(self) -> str:
        """What the job builds: backend, model, options and the GPU type engines are built for."""
        facts = {"backend": self.backend, "model": self.source or self.model, "tool_version": __version__,
                 "options": {k: v for k, v in sorted(self.options.items()) if k not in NOT_FINGERPRINTED},
                 "accelerator_type": self.resources.get("accelerator_type")}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def command_options(command) -> dict[str, Option]:
    """JOBS.yaml keys of a backend command, from its (click) parameters: every long option."""
    out = {}
    for p in command.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        longs = [o for o in p.opts if o.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:].replace("-", "_")
        out[key] = Option(key, longs[0], bool(getattr(p, "is_flag", False)) and not p.secondary_opts)
    return out


def load(path: Path, commands: dict, *, cluster: bool) -> list[Job]:
    """Read and validate JOBS.yaml; every problem is a BadInput naming the file, the job and the key."""
    import yaml

    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise BadInput(f"{where}: cannot read the jobs file ({e.strerror}); give a readable JOBS.yaml") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise BadInput(f"{where}: not valid YAML{at} ({getattr(e, 'problem', None) or e}); fix the syntax") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise BadInput(f"{where}: expected a mapping with `jobs:`, a non-empty list of jobs")
    for key in data:
        if key not in TOP_KEYS:
            raise BadInput(f"{where}: unknown top-level key {key!r}; use {' and '.join(TOP_KEYS)}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise BadInput(f"{where}: `defaults` must be a mapping of job keys")
    known_anywhere = set(JOB_KEYS) | {k for c in commands.values() for k in command_options(c)}
    for key in defaults:
        if key in ("name", "model"):
            raise BadInput(f"{where}: defaults: {key!r} is per job; set it in each job")
        if key not in known_anywhere:
            raise BadInput(f"{where}: defaults: unknown key {key!r}; use a job key or a long option of "
                           f"lmi-compile trtllm/neuron (with _ for -)")
    jobs, names, uploads = [], set(), {}
    for i, raw in enumerate(data["jobs"]):
        job = _job(where, i, raw, defaults, commands, cluster)
        if job.name in names:
            raise BadInput(f"{where}: job {job.name!r}: duplicate name; job names must be unique")
        names.add(job.name)
        if job.upload:
            norm = job.upload.rstrip("/") + "/"
            if norm in uploads:
                raise BadInput(f"{where}: job {job.name!r}: upload {job.upload} is also job {uploads[norm]!r}'s; "
                               f"give each job its own prefix")
            uploads[norm] = job.name
        jobs.append(job)
    return jobs


def _job(where: str, i: int, raw, defaults: dict, commands: dict, cluster: bool) -> Job:
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: jobs[{i}] is not a mapping; give name, backend, model and options")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{where}: jobs[{i}]: `name` is missing; every job needs a unique name")
    if not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        # a job's folders are named after it: `..` would put one in its parent
        raise BadInput(f"{where}: job {name!r}: `name` may hold letters, digits, '.', '_' and '-' only, and may not "
                       f"start with '.'")
    label = f"{where}: job {name!r}"
    backend = raw.get("backend", defaults.get("backend"))
    if backend not in BACKENDS:
        raise BadInput(f"{label}: `backend` is {backend!r}; use {' or '.join(BACKENDS)}")
    allowed = command_options(commands[backend])
    merged = {k: v for k, v in defaults.items() if k in allowed or k in JOB_KEYS}
    merged.update(raw)
    model = merged.get("model")
    if not isinstance(model, str) or not model:
        raise BadInput(f"{label}: `model` is missing; give a Hub repo id, s3://bucket/prefix/ or a local folder")
    resources = merged.get("resources") or {}
    if not isinstance(resources, dict):
        raise BadInput(f"{label}: `resources` must be a mapping ({', '.join(RESOURCE_KEYS)})")
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            raise BadInput(f"{label}: resources: unknown key {key!r}; use {', '.join(RESOURCE_KEYS)}")
        if key in ("gpus", "neuron_cores", "memory_gb") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise BadInput(f"{label}: resources: {key} must be a non-negative number (got {value!r})")
        if key in ("accelerator_type", "instance") and not isinstance(value, str):
            raise BadInput(f"{label}: resources: {key} must be a string such as A10G (got {value!r})")
    options = {}
    for key, value in merged.items():
        if key in JOB_KEYS:
            continue
        if key in MANAGED:
            raise BadInput(f"{label}: {key!r} cannot be set in a batch job: {MANAGED[key]}")
        if key not in allowed:
            raise BadInput(f"{label}: unknown key {key!r}; lmi-compile {backend} has no --{key.replace('_', '-')} "
                           f"(see lmi-compile {backend} --help)")
        options[key] = value
    if cluster and not options.get("upload"):
        raise BadInput(f"{label}: `upload` is missing; on a cluster the output stays on the node that built it, "
                       f"so each job needs an s3:// upload prefix")
    job = Job(name=name, backend=backend, model=model, options=options, resources=dict(resources))
    job.argv = _argv(label, backend, options, allowed)
    _parse_check(label, commands[backend], backend, [model, *job.argv])
    return job


def _argv(label: str, backend: str, options: dict, allowed: dict[str, Option]) -> list[str]:
    argv = []
    for key, value in options.items():
        opt = allowed[key]
        if opt.is_flag:
            if not isinstance(value, bool):
                raise BadInput(f"{label}: {key} is a switch; give true or false (got {value!r})")
            if value:
                argv.append(opt.flag)
            continue
        if value is None or isinstance(value, (dict, bool)):
            raise BadInput(f"{label}: {key}: give a value as on the command line (got {value!r})")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        argv += [opt.flag, str(value)]
    return argv


def _parse_check(label: str, command, backend: str, args: list[str]) -> None:
    """Parse the job's command line with the backend command's own parser: types, ranges and choices."""
    try:
        command.make_context(backend, list(args), resilient_parsing=False)
    except Exception as e:  # click's UsageError family (typer vendors click, so match by behaviour)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise BadInput(f"{label}: {' '.join(message.split())}") from None
