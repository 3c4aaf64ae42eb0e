"""Before scheduling: what each job asks of a node, and whether its model fits the instance it is for (`plan`).

A job that cannot fit is reported and not run: hours of fetch and build would end in an engine that does not
load. The sizes come from `lmi_compile.lmi.plan` (config.json and the weight index only; no weights).
"""

from lmi_compile.batch.jobs import Job
from lmi_compile.errors import BadInput

GiB = 1024 ** 3


def instance_for(resources: dict, kind: str, count: int) -> str | None:
    """The instance a job's resources describe: `instance` when given, else the smallest instance of the
    accelerator type with at least `count` accelerators (None when the type is not in the table)."""
    from lmi_compile.configs import load_json

    from lmi_compile.lmi.plan import instance_spec

    table = load_json("instances.json")["instances"]
    if resources.get("instance"):
        return instance_spec(resources["instance"])[0]
    accel = resources.get("accelerator_type")
    fits = [(spec["count"], name) for name, spec in table.items() if spec["kind"] == kind and spec["count"] >= count
            and (accel is None and kind == "neuron" or spec["accelerator"] == accel)]
    return min(fits, key=lambda f: f[0])[1] if fits else None  # the first of the smallest, in table order


# What a CPU-stage process holds besides tensors: the interpreter, torch, safetensors, boto3.
CPU_STAGE_BASE = 1 * GiB


def cpu_stage_request(job: Job, config) -> dict:
    """The Ray request of the job's CPU stages (fetch, convert/split, hand-over), sized from the model as `plan`
    reads it: the converters stream tensor by tensor, so memory is bounded by the largest tensor (the embedding or
    a linear, read and written once each) times the writers that run at once, plus the process itself."""
    from lmi_compile.model.architectures import resolve

    d = resolve(config).dims
    width = 4 if config.dtype == "float32" else 2
    largest = max(d.vocab_size * d.hidden_size, d.intermediate_size * d.hidden_size) * width
    tp, pp = int(job.options.get("tp") or (1 if job.backend == "trtllm" else 2)), int(job.options.get("pp") or 1)
    writers = min(job.options.get("workers") or 8, tp * pp) if job.backend == "trtllm" else 4
    return {"num_cpus": 1, "memory": int(CPU_STAGE_BASE + 2 * largest * writers)}


def ray_resources(job: Job) -> dict:
    """The Ray request of the job's build/compile task: GPUs of its accelerator type, NeuronCores, memory."""
    r = job.resources
    req = {"num_cpus": 1, "resources": {}}
    if job.backend == "trtllm":
        req["num_gpus"] = r.get("gpus", 1)
        if r.get("accelerator_type"):
            req["resources"][f"accelerator_type:{r['accelerator_type']}"] = 0.001  # a marker: any share will do
    else:
        req["resources"]["neuron_cores"] = r.get("neuron_cores", int(job.options.get("tp") or 2))
    if r.get("memory_gb"):
        req["memory"] = int(r["memory_gb"] * GiB)
    return req


def check_fit(job: Job, config) -> str | None:
    """None when the job fits its instance (or names none), else why not, in one line. `config`: the model's
    config.json (remote/peek.py: read_remote_config)."""
    from lmi_compile.lmi.plan import make_plan
    from lmi_compile.lmi.targets import resolve as resolve_target
    from lmi_compile.model.dtypes import AMP_DTYPES
    from lmi_compile.neuron.backend import VALID_TP

    o = job.options
    tp, pp = int(o.get("tp") or (1 if job.backend == "trtllm" else 2)), int(o.get("pp") or 1)
    if job.backend == "trtllm":
        d = resolve_target("trtllm", o.get("lmi_version"))["defaults"]
        batch = int(o.get("max_batch_size") or d["max_batch_size"])
        seq = o.get("max_seq_len") or (int(o.get("max_input_len") or d["max_input_len"])
                                       + int(o.get("max_output_len") or d["max_output_len"] or 0))
        dtype = o.get("dtype") or "auto"
        instance = instance_for(job.resources, "gpu", tp * pp)
    else:
        batch = int(o.get("batch_size") or 4)
        seq = o.get("n_positions") or min(4096, config.get("max_position_embeddings", 4096))
        dtype = AMP_DTYPES.get(o.get("amp") or "", "auto")
        instance = instance_for(job.resources, "neuron", tp)
    if instance is None:
        return None  # an accelerator the instance table does not know: nothing to check against
    try:
        plan = make_plan(config, tp=tp, pp=pp, dtype=dtype, max_batch_size=batch, max_seq_len=int(seq),
                         instance=instance, tp_choices=None if job.backend == "trtllm" else VALID_TP)
    except BadInput as e:
        return str(e)
    if plan.fits:
        return None
    if plan.tp * plan.pp > _count(instance):
        return f"does not fit {instance}: tp*pp = {plan.tp * plan.pp} exceeds its {_count(instance)} accelerators"
    need, have = plan.needed_per_accelerator / GiB, plan.memory_per_accelerator / GiB
    return (f"does not fit {instance}: {need:.1f} GiB needed per accelerator (weights and KV cache for batch "
            f"{batch} x {seq} tokens) of {have:.0f} GiB; tp values that fit: {plan.fitting_tp or 'none'} "
            f"(see lmi-compile plan)")


def _count(instance: str) -> int:
    from lmi_compile.lmi.plan import instance_spec

    return instance_spec(instance)[1]["count"]
