"""Check a local model folder against the LMI artifact rules before any heavy work."""

from dataclasses import dataclass
from pathlib import Path

from lmi_compile.model.checkpoint import Checkpoint
from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig, read_json
from lmi_compile.model.files import REQUIRED_FILES, custom_code_files


@dataclass
class ValidatedModel:
    root: Path
    config: ModelConfig
    checkpoint: Checkpoint
    custom_code: list[str]


def validate_model_dir(root: Path, *, trust_remote_code: bool = False) -> ValidatedModel:
    """Validate a HuggingFace pretrained-format folder; raise BadInput naming the file and the fix."""
    root = Path(root)
    if not root.exists():
        raise BadInput(f"{root}: no such folder; give a local model folder, a Hub repo id or an s3:// prefix")
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder; give the folder that holds config.json")
    for req in REQUIRED_FILES:
        if not (root / req).is_file():
            raise BadInput(f"{root / req}: missing; LMI needs it (save the model and tokenizer with save_pretrained)")
    read_json(root / "tokenizer_config.json")
    config = ModelConfig.load(root / "config.json")
    code = custom_code_files(p.name for p in root.iterdir() if p.is_file())
    if (code or config.uses_custom_code) and not trust_remote_code:
        what = ", ".join(code[:3]) if code else "auto_map in config.json"
        raise BadInput(f"{root}: holds custom code ({what}); rerun with --trust-remote-code if you trust it "
                       f"(and set option.trust_remote_code=true when deploying)")
    checkpoint = Checkpoint(root)
    if not checkpoint.tensors:
        raise BadInput(f"{checkpoint.files[0]}: holds no tensors; the checkpoint is empty")
    return ValidatedModel(root, config, checkpoint, code)
