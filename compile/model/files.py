"""Which files of a HuggingFace model repository a compile needs, as data.

Used by every source (Hub, S3) so they download the same set: config, tokenizer and generation
files, exactly one weight format, and custom code only when the user trusts it.
"""

import fnmatch
from pathlib import Path, PurePosixPath

from lmi_compile.model.checkpoint import PYTORCH_INDEX, PYTORCH_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SHARD_RE
from lmi_compile.errors import BadInput

# Small files that travel with the model into every output layout. hf_quant_config.json: ModelOpt's quantization,
# which the converter reads (model/quantization.py).
CONFIG_FILES = ("config.json", "generation_config.json", "hf_quant_config.json")
TOKENIZER_FILES = (
    "tokenizer_config.json", "tokenizer.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.json", "chat_template.jinja",
)
CUSTOM_CODE_PATTERN = "*.py"
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


def top_level(names):
    # Sub-folders (e.g. Llama 3's original/ with consolidated.pth) are never what LMI loads.
    return {n for n in names if "/" not in n}


def custom_code_files(names) -> list[str]:
    return sorted(n for n in top_level(names) if fnmatch.fnmatch(n, CUSTOM_CODE_PATTERN))


def small_files(names, *, trust_remote_code: bool, source: str) -> list[str]:
    """The non-weight files to fetch first (config, tokenizer, generation, indexes, custom code)."""
    names = top_level(names)
    code = custom_code_files(names)
    if code and not trust_remote_code:
        raise BadInput(f"{source}: holds custom code ({', '.join(code[:3])}); rerun with --trust-remote-code "
                       f"if you trust it (and set option.trust_remote_code=true when deploying)")
    for req in REQUIRED_FILES:
        if req not in names:
            raise BadInput(f"{source}: {req} is missing; LMI needs it (save the model and tokenizer "
                           f"with save_pretrained)")
    wanted = set(CONFIG_FILES) | set(TOKENIZER_FILES) | {SAFETENSORS_INDEX, PYTORCH_INDEX}
    return sorted(n for n in names if n in wanted) + code


def weight_files(names, index: dict | None, index_name: str | None, *, source: str) -> list[str]:
    """The weight files to fetch: those the index names, else the single file or shards of one format."""
    names = top_level(names)
    if index is not None:
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise BadInput(f"{source}/{index_name}: no weight_map; re-save the model with save_pretrained")
        files = sorted({str(v) for v in wm.values()})
        for f in files:
            rel = PurePosixPath(f)
            if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
                raise BadInput(f"{source}/{index_name}: names {f!r}, outside the model folder; the index is corrupt")
            if f not in names:
                raise BadInput(f"{source}/{index_name}: names {f}, which {source} does not have; "
                               f"upload the missing shard")
        return files
    for single, ext in ((SAFETENSORS_SINGLE, ".safetensors"), (PYTORCH_SINGLE, ".bin")):
        if single in names:
            return [single]
        shards = sorted(n for n in names if n.endswith(ext) and SHARD_RE.match(n))
        if shards:
            return shards
    raise BadInput(f"{source}: no weights (model.safetensors, sharded safetensors with {SAFETENSORS_INDEX}, "
                   f"or pytorch_model*.bin); LMI loads only safetensors or PyTorch checkpoints")


def preferred_index(names) -> str | None:
    names = top_level(names)
    if SAFETENSORS_INDEX in names:
        return SAFETENSORS_INDEX
    has_st = SAFETENSORS_SINGLE in names or any(n.endswith(".safetensors") and SHARD_RE.match(n) for n in names)
    if PYTORCH_INDEX in names and not has_st:
        return PYTORCH_INDEX
    return None


def carried_files(model_root: Path) -> list[Path]:
    """The HF config, generation and tokenizer files every layout carries, and the model's custom code (a custom
    tokenizer's *.py is loaded from beside tokenizer_config.json; a model has it only with --trust-remote-code)."""
    named = [model_root / n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if (model_root / n).is_file()]
    return named + sorted(p for p in model_root.glob(CUSTOM_CODE_PATTERN) if p.is_file())
