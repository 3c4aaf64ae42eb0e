"""TEST DOUBLE: NeuronConfig and ContinuousBatchingConfig keep their keyword arguments, for hashing."""

# NeuronConfig's keyword-only fields (transformers-neuronx 0.13, config.py); anything else asserts there too.
FIELDS = {"sparse_attn", "quant", "kv_cache_quant", "continuous_batching", "attention_layout", "collectives_layout",
          "cache_layout", "padding_side", "group_query_attention", "sequence_parallel_norm",
          "sequence_parallel_norm_threshold", "on_device_embedding", "on_device_generation", "all_reduce_dtype",
          "cast_logits_dtype", "fuse_qkv", "qkv_tiling", "weight_tiling", "log_softmax_scores",
          "shard_over_sequence", "output_all_logits", "attn_output_transposed", "fused_rmsnorm_qkv",
          "fused_rmsnorm_mlp", "mlp_out_weight_transpose", "fuse_mlp", "compilation_worker_count"}


class ContinuousBatchingConfig:
    def __init__(self, batch_size_for_shared_caches):
        self.batch_size_for_shared_caches = batch_size_for_shared_caches

    def as_dict(self) -> dict:
        return {"batch_size_for_shared_caches": self.batch_size_for_shared_caches}


class NeuronConfig:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - FIELDS
        assert not unknown, f"NeuronConfig got unknown fields {sorted(unknown)}"
        self.fields = kwargs
        self.on_device_embedding = bool(kwargs.get("on_device_embedding", False))

    def as_dict(self) -> dict:
        return {k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in sorted(self.fields.items())}
