"""The transformers-neuronx calls a target LMI release's Neuron loader makes, and the serving.properties
that make it make them.

transformers-neuronx names each compiled graph `<sha256(HLO)[:20]>.neff`, and the HLO depends on every
argument of the model construction: the class, batch_size, tp_degree, amp, n_positions (an int gives
buckets 128..N, a list only its entries), context_length_estimate and each NeuronConfig field. LMI rebuilds
the model from serving.properties at load time and looks the graphs up by hash, so an ahead-of-time
compile must make exactly the calls that release's TNXModelLoader makes. The per-release rules are rows
of configs/targets.json ("neuron"); this module only applies them, and the compile entry point runs what
it returns.
"""

from dataclasses import asdict, dataclass

from lmi_compile.errors import BadInput

AMP_TO_LMI = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}
LMI_TO_AMP = {v: k for k, v in AMP_TO_LMI.items()}
FIRST_BUCKET, INITIAL_BUCKET = 128, 1024


@dataclass(frozen=True)
class LoaderCalls:
    """`model_class.from_pretrained(dir, neuron_config=NeuronConfig(**neuron_config), **kwargs)`, then
    `to_neuron()` (or `cpu_compile()` where transformers-neuronx has it and no device is present), then
    `save(dir)` / `save(dir, sharded_weights=True)`. `continuous_batching` in neuron_config holds the
    ContinuousBatchingConfig keyword arguments."""

    model_class: str
    kwargs: dict
    neuron_config: dict
    sharded_weights: bool

    def to_json(self) -> dict:
        return asdict(self)


def build_context_length_estimates(n_positions: int) -> list[int]:
    """LMI 0.30+'s default context buckets for continuous batching: 128, 1024, 2048, ... below N, then N
    (djl-serving@0.30.0-dlc:engines/python/setup/djl_python/neuron_utils/utils.py)."""
    if n_positions <= FIRST_BUCKET:
        return [n_positions]
    out, bucket = [FIRST_BUCKET], INITIAL_BUCKET
    while n_positions > bucket:
        out.append(bucket)
        bucket *= 2
    return out + [n_positions]


def architecture(target, arch_name: str) -> dict:
    """The loader's entry (model_type, class) for an HF architecture, or a BadInput saying why not."""
    entry = target["architectures"].get(arch_name)
    if entry is None:
        why = target.get("not_loaded", {}).get(arch_name) or \
            f"{target.describe()}'s Neuron loader has no class for it"
        raise BadInput(f"architecture {arch_name} cannot be served by {target.describe()}: {why}; Neuron "
                       f"supports {', '.join(sorted(target['architectures']))} there")
    return entry


def continuous_batching(target, model_type: str, batch_size: int) -> bool:
    """Whether the loader turns on continuous batching (rolling batch is always on in what we write)."""
    rule = target["continuous_batching"]
    types = rule["model_types"]
    return (types is None or model_type in types) and batch_size >= rule["min_batch_size"]


def loader_calls(target, arch_name: str, *, batch_size: int, tp: int, n_positions: int, amp: str,
                 context_length_estimate: list[int], layout: str) -> LoaderCalls:
    """The calls `target`'s loader makes for a model of `arch_name` compiled with these settings and served
    from `layout` with the serving.properties `serving_options` writes. Raises BadInput where that release
    would refuse the settings."""
    entry = architecture(target, arch_name)
    if layout not in target["layouts"]:
        raise BadInput(f"--format {layout}: {target.describe()} does not load it; use --format "
                       f"{' or '.join(target['layouts'])}")
    cb = continuous_batching(target, entry["model_type"], batch_size)
    # With rolling batch on, LMI sets batch_size = max_rolling_batch_size before building the model.
    kwargs = {"batch_size": batch_size, "amp": amp, "tp_degree": tp, "n_positions": n_positions}
    neuron_config = {}
    cle = list(context_length_estimate) or None
    if cb:
        neuron_config["continuous_batching"] = {"batch_size_for_shared_caches": batch_size}
        kwargs["n_positions"] = [n_positions]
        if cle and target["cb_user_context_length_estimate"] == "must_equal_n_positions" and cle != [n_positions]:
            from lmi_compile.lmi.targets import releases, resolve

            order = releases("neuron")  # oldest first
            later = [r for r in order[order.index(target.release) + 1:]
                     if resolve("neuron", r)["cb_user_context_length_estimate"] != "must_equal_n_positions"]
            raise BadInput(f"--context-length-estimate {','.join(map(str, cle))}: {target.describe()} uses "
                           f"continuous batching here and accepts only [n_positions] ({n_positions}); drop the "
                           f"option" + (f" or use --lmi-version {later[0]} or later" if later else ""))
        if cle is None:
            cle = [n_positions] if target["cb_context_length_estimate"] == "n_positions" else \
                build_context_length_estimates(n_positions)
    if cle is not None:
        kwargs["context_length_estimate"] = cle
    if target["on_device_embedding"]:
        neuron_config["on_device_embedding"] = True
    sharded = layout == "optimum" and target["optimum_tree"] == "presharded"
    return LoaderCalls(entry["class"], kwargs, neuron_config, sharded)


def serving_options(target, calls: LoaderCalls, *, layout: str, model_id: str | None,
                    compiled_graph_path: str | None, trust_remote_code: bool) -> dict:
    """serving.properties options under which `target` rebuilds exactly `calls`: every setting stated, so
    no release default or smart default (rolling batch choice, n_positions, tp, batch size, buckets,
    on-device embedding) can differ from what was compiled."""
    kw, nc = calls.kwargs, calls.neuron_config
    n = kw["n_positions"][0] if isinstance(kw["n_positions"], list) else kw["n_positions"]
    cle = kw.get("context_length_estimate")
    opts = {
        "model_id": model_id,
        "tensor_parallel_degree": kw["tp_degree"],
        "n_positions": n,
        "max_rolling_batch_size": kw["batch_size"],
        "dtype": AMP_TO_LMI[kw["amp"]],
        **target["options"],
    }
    if target.get("strategy_option"):
        opts["rolling_batch_strategy"] = "continuous_batching" if "continuous_batching" in nc else "naive_rolling_batch"
    opts["context_length_estimate"] = ",".join(map(str, cle)) if cle else None
    opts["load_split_model"] = True if layout == "split" else None
    opts["compiled_graph_path"] = compiled_graph_path
    opts["trust_remote_code"] = True if trust_remote_code else None
    return opts
