"""Lazy, read-only access to a HuggingFace weight set (safetensors or PyTorch pickles, single or sharded).

Nothing here loads a whole model: safetensors headers are parsed by hand (to validate offsets before
any heavy work) and tensors are read one at a time through mmap.
"""

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmi_compile.errors import BadInput
from lmi_compile.model.config import read_json
from lmi_compile.paths import resolve_inside
from lmi_compile.pipeline.interrupts import import_held

from lmi_compile.model.dtypes import ST_DTYPE_SIZE, ST_TO_TORCH

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PYTORCH_SINGLE = "pytorch_model.bin"
SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None = None  # absolute byte offset in a safetensors file; None for pickles


def read_safetensors_metadata(path: Path) -> dict:
    """The header's __metadata__ of a safetensors file that passes read_safetensors_header's checks."""
    meta = _raw_header(path)[0].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _raw_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON, file size, header length), with the checks that need no tensor bookkeeping."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return parse_raw_header(read, size, str(path))


def parse_raw_header(read, size: int, where: str) -> tuple[dict, int, int]:
    """The header of a safetensors file of `size` bytes, through `read(offset, length)`: local or ranged S3 reads."""
    head = read(0, 8) if size >= 8 else b""
    if len(head) < 8:
        raise BadInput(f"{where}: truncated safetensors file ({size} bytes); download it again")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise BadInput(f"{where}: safetensors header length {n} overruns the file ({size} bytes); "
                       f"the file is truncated or not safetensors, download it again")
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(f"{where}: safetensors header is not valid JSON; the file is corrupt, download it again") from None
    if not isinstance(header, dict):
        raise BadInput(f"{where}: safetensors header is not a JSON object; the file is corrupt")
    return header, size, n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: JSON valid, offsets contiguous, inside the file, sizes match."""
    return check_safetensors_header(*_raw_header(path), path)


def check_safetensors_header(header: dict, size: int, n: int, path) -> dict[str, TensorInfo]:
    """The tensors a raw header describes, refusing headers that lie about the file (`path` names it)."""
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets; the file is corrupt") from None
        if dtype not in ST_DTYPE_SIZE:
            raise BadInput(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        numel = 1
        for d in shape:
            if d < 0:
                raise BadInput(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= d
        expected = numel * ST_DTYPE_SIZE[dtype]
        if not (0 <= begin <= end) or end - begin != expected:
            raise BadInput(f"{path}: tensor {name!r} offsets {begin}..{end} do not match its shape {list(shape)} "
                           f"and dtype {dtype} ({expected} bytes); the header lies, re-save the checkpoint")
        if end > data_len:
            raise BadInput(f"{path}: tensor {name!r} ends at byte {end} but the file holds {data_len} data bytes; "
                           f"the file is truncated, download it again")
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, path, ST_TO_TORCH.get(dtype, dtype), shape, expected, 8 + n + begin)
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise BadInput(f"{path}: tensors {n1!r} and {n2!r} overlap in the file; the header lies")
    return out


def _read_index(root: Path, index_name: str) -> dict[str, str]:
    index_path = root / index_name
    data = read_json(index_path)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise BadInput(f"{index_path}: no weight_map; re-save the model with save_pretrained")
    for tensor, fname in wm.items():
        if not isinstance(fname, str):
            raise BadInput(f"{index_path}: weight_map entry {tensor!r} is not a file name")
    return wm


def find_weight_set(root: Path) -> tuple[str, str | None, list[str]]:
    """Decide which weights a model folder holds: (format, index file or None, shard names).

    safetensors wins over .bin when both are present, as transformers and LMI do.
    """
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    for fmt, index, single, ext in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ".safetensors"),
                                    ("pytorch", PYTORCH_INDEX, PYTORCH_SINGLE, ".bin")):
        if index in names:
            wm = _read_index(root, index)
            return fmt, index, sorted(set(wm.values()))
        if single in names and (root / single).is_file():
            return fmt, None, [single]
        shards = sorted(n for n in names if n.endswith(ext) and SHARD_RE.match(n))
        if shards:
            return fmt, None, shards
    raise BadInput(f"{root}: no weights found (expected model.safetensors, model-*-of-*.safetensors with "
                   f"{SAFETENSORS_INDEX}, or pytorch_model*.bin); save the model with save_pretrained")


def load_pickle(path: Path):
    """Load a PyTorch .bin with weights_only (pickled code is refused, never run), mmapped when possible."""
    import pickle

    torch = import_held("torch")
    try:
        mmap_ok = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported global"
        raise BadInput(f"{path}: refused to load: the pickle holds more than tensors ({first[:160]}); "
                       f"only weights_only pickles are accepted, convert the checkpoint to safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        # a zero-byte file (a failed download) raises EOFError with no message
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BadInput(f"{path}: cannot read PyTorch checkpoint ({why}); "
                       f"the file is corrupt or truncated, download it again") from None


class Checkpoint:
    """The tensors of a model folder, by name, read lazily."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.format, self.index_name, shard_names = find_weight_set(self.root)
        what = str(self.root / (self.index_name or shard_names[0]))
        self.files = [resolve_inside(self.root, n, what=what) for n in shard_names]
        for f in self.files:
            if not f.is_file():
                raise BadInput(f"{what}: names {f.name}, which is not in {self.root}; download the missing shard")
        self._handles: dict[Path, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            infos = read_safetensors_header(f) if self.format == "safetensors" else self._pickle_infos(f)
            for name, info in infos.items():
                if name in self.tensors:
                    raise BadInput(f"{f}: tensor {name!r} also appears in {self.tensors[name].file.name}; "
                                   f"a checkpoint must name each tensor once")
                self.tensors[name] = info
        if self.index_name:
            self._check_index(what)

    def _pickle_infos(self, path: Path) -> dict[str, TensorInfo]:
        torch = import_held("torch")
        sd = load_pickle(path)
        if not isinstance(sd, dict):
            raise BadInput(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
        out = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise BadInput(f"{path}: entry {name!r} is not a tensor")
            out[name] = TensorInfo(name, path, str(t.dtype).replace("torch.", ""), tuple(t.shape),
                                   t.numel() * t.element_size())
        self._handles[path] = sd  # keep the mmapped dict: later reads cost nothing extra
        return out

    def _check_index(self, what: str) -> None:
        wm = _read_index(self.root, self.index_name)
        for tensor, fname in wm.items():
            info = self.tensors.get(tensor)
            if info is None or info.file.name != Path(fname).name:
                raise BadInput(f"{what}: says {tensor!r} is in {fname}, but that file does not hold it; "
                               f"the index and shards are from different saves, download them again")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str):
        """One tensor of a PyTorch pickle checkpoint (mmapped; safetensors are read by offset instead)."""
        info = self.tensors[name]
        h = self._handles.get(info.file)
        if h is None:
            h = self._handles[info.file] = load_pickle(info.file)
        return h[name]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def require_shape(self, name: str, expect: tuple[int, ...]) -> None:
        """Refuse a tensor whose shape is not the one config.json implies (model/architectures.py source_shapes)."""
        have = tuple(self.tensors[name].shape)
        if have != tuple(expect):
            raise BadInput(f"{self.tensors[name].file}: tensor {name!r} has shape {list(have)}, but config.json "
                           f"implies {list(expect)}; config and weights disagree")

    def identity(self) -> list:
        """What identifies these weights for stage fingerprints: names, sizes and mtimes of the files."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([f.name, st.st_size, st.st_mtime_ns])
        return out
