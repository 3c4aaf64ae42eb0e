"""Read a model's config.json (and its index's total size, and ModelOpt's hf_quant_config.json) without downloading
weights: the first look that lets `plan` size a model, and the backends refuse what their target cannot serve (a
quantization scheme included) before any download."""

import dataclasses
import json
import tempfile
from pathlib import Path

from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig, read_json
from lmi_compile.model.quantization import MODELOPT_FILE, with_modelopt_file


def read_remote_config(model: str, revision: str | None, token: str | None) -> tuple[ModelConfig, int | None]:
    """config.json and the index's total_size, without downloading weights (a local folder, the Hub or S3).
    Messages about a remote config name it by its source, e.g. org/model/config.json."""
    from lmi_compile.remote.fetch import parse_source

    source = parse_source(model, revision)
    with tempfile.TemporaryDirectory(prefix="lmi-compile-peek-") as tmp:
        return _read(source, model, revision, token, Path(tmp))


def _read(source, model: str, revision: str | None, token: str | None, tmp: Path) -> tuple[ModelConfig, int | None]:
    if source.kind == "local":
        root = Path(source.location)
        if not (root / "config.json").is_file():
            raise BadInput(f"{root / 'config.json'}: missing")
    elif source.kind == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        from lmi_compile.remote.hub import translate_error

        root = tmp
        for name in ("config.json", "model.safetensors.index.json", MODELOPT_FILE):
            try:
                hf_hub_download(model, name, revision=revision, token=token, local_dir=tmp)
            except EntryNotFoundError:
                if name == "config.json":
                    raise BadInput(f"{model}: config.json is missing") from None
            except Exception as e:
                raise translate_error(e, model, revision) from None
    else:
        from lmi_compile.remote.s3 import make_client, parse_s3_uri, translate

        uri = parse_s3_uri(source.location)
        client = make_client()
        root = tmp
        for name in ("config.json", "model.safetensors.index.json", MODELOPT_FILE):
            try:
                (tmp / name).write_bytes(client.get_object(Bucket=uri.bucket, Key=uri.key(name))["Body"].read())
            except Exception as e:
                if name == "config.json":
                    raise translate(e, f"{uri}{name}") from None
    config = ModelConfig.load(root / "config.json")
    if source.kind != "local":
        config = dataclasses.replace(config, path=Path(f"{source.location.rstrip('/')}/config.json"))
        if (root / MODELOPT_FILE).is_file():  # the copy goes with the temporary folder: carried in the config
            config = with_modelopt_file(config, read_json(root / MODELOPT_FILE),
                                        f"{source.location.rstrip('/')}/{MODELOPT_FILE}")
    total = None
    idx = root / "model.safetensors.index.json"
    if idx.is_file():
        try:
            total = int(json.loads(idx.read_text()).get("metadata", {}).get("total_size") or 0) or None
        except (ValueError, TypeError):
            total = None
    return config, total
