"""Write safetensors files one tensor at a time.

The header is computed from the planned names, dtypes and shapes before any data exists, so a rank file
of many GB is written with only the tensor in hand in memory. The file appears under its final name
only when complete (temporary name, fsync, rename).
"""

import json
import os
import struct
from pathlib import Path

from lmi_compile.checkpoint import ST_DTYPE_SIZE, TORCH_TO_ST


class SafetensorsWriter:
    def __init__(self, path: Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        """`plan`: (name, torch dtype name, shape) in the order tensors will be written."""
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._plan = list(plan)
        self._next = 0
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._plan:
            st = TORCH_TO_ST[dtype]
            n = ST_DTYPE_SIZE[st]
            for d in shape:
                n *= d
            header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the safetensors library does
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, tensor) -> None:
        """Append the next planned tensor (name, dtype and shape must match the plan)."""
        pname, pdtype, pshape = self._plan[self._next]
        got_dtype = str(tensor.dtype).replace("torch.", "")
        if name != pname or got_dtype != pdtype or tuple(tensor.shape) != tuple(pshape):
            raise ValueError(f"{self.path.name}: expected {pname} {pdtype} {list(pshape)}, "
                             f"got {name} {got_dtype} {list(tensor.shape)}")
        t = tensor.detach().contiguous()
        if t.numel():
            self._f.write(t.view(-1).view(__import__("torch").uint8).numpy().data)
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._plan):
            raise ValueError(f"{self.path.name}: {len(self._plan) - self._next} planned tensors were not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        else:
            self.abort()
