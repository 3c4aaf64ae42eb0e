"""Write safetensors files one tensor at a time.

The header is computed from the planned names, dtypes and shapes before any data exists, so a rank file
of many GB is written with at most one row block in memory; byte ranges of source files are copied by
the kernel (copy_file_range) without entering this process. The file appears under its final name only
when complete (temporary name, fsync, rename).
"""

import json
import os
import struct
from pathlib import Path

import torch

from lmi_compile.checkpoint import ST_DTYPE_SIZE, TORCH_TO_ST

from .tensor_reader import BLOCK_BYTES, FileRange, Zeros, itemsize


class SafetensorsWriter:
    def __init__(self, path: Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        """`plan`: (name, torch dtype name, shape) in the order tensors will be written."""
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._plan = list(plan)
        self._sizes = []
        self._next = 0
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._plan:
            n = ST_DTYPE_SIZE[TORCH_TO_ST[dtype]]
            for d in shape:
                n *= d
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._sizes.append(n)
            offset += n
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the safetensors library does
        self._f = open(self.tmp, "wb", buffering=0)
        self._write(struct.pack("<Q", len(blob)) + blob)

    def _write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._f.write(view[done:])
        return done

    def _copy_range(self, rng: FileRange, read_range) -> int:
        """Copy a source byte range into the file, in the kernel when the platform allows."""
        left, off = rng.nbytes, rng.offset
        if hasattr(os, "copy_file_range"):
            src = os.open(rng.path, os.O_RDONLY)
            try:
                while left:
                    n = os.copy_file_range(src, self._f.fileno(), min(left, 1 << 30), off)
                    if n <= 0:
                        break
                    left -= n
                    off += n
            except OSError:
                pass  # e.g. EXDEV or unsupported filesystem: finish below through memory
            finally:
                os.close(src)
        while left:
            chunk = min(left, BLOCK_BYTES)
            self._write(read_range(FileRange(rng.path, off, chunk, "uint8")).numpy())
            left -= chunk
            off += chunk
        return rng.nbytes

    def _write_tensor(self, t: torch.Tensor, dtype: torch.dtype) -> int:
        t = t.to(dtype).contiguous()
        return self._write(t.view(-1).view(torch.uint8).numpy()) if t.numel() else 0

    def write_pieces(self, name: str, pieces, read_range) -> None:
        """Append the next planned tensor from its pieces (FileRange, Zeros or tensors), casting as needed.

        `read_range(FileRange) -> tensor` reads a range into memory (used only when a cast is needed).
        """
        pname, pdtype, _ = self._plan[self._next]
        if name != pname:
            raise ValueError(f"{self.path.name}: expected tensor {pname}, got {name}")
        dtype = getattr(torch, pdtype)
        size = itemsize(pdtype)
        written = 0
        for piece in pieces:
            if isinstance(piece, FileRange) and piece.dtype == pdtype:
                written += self._copy_range(piece, read_range)
            elif isinstance(piece, FileRange):
                per_block = max(1, BLOCK_BYTES // itemsize(piece.dtype))
                for start in range(0, piece.numel, per_block):
                    n = min(per_block, piece.numel - start)
                    sub = FileRange(piece.path, piece.offset + start * itemsize(piece.dtype), n, piece.dtype)
                    written += self._write_tensor(read_range(sub), dtype)
            elif isinstance(piece, Zeros):
                zeros = bytes(min(piece.numel * size, BLOCK_BYTES))
                left = piece.numel * size
                while left:
                    written += self._write(zeros[:min(left, len(zeros))])
                    left -= min(left, len(zeros))
            else:
                written += self._write_tensor(piece, dtype)
        if written != self._sizes[self._next]:
            raise ValueError(f"{self.path.name}: tensor {name} got {written} bytes, planned {self._sizes[self._next]}")
        self._next += 1

    def write(self, name: str, tensor) -> None:
        """Append the next planned tensor from one in-memory tensor (dtype and shape must match the plan)."""
        pname, pdtype, pshape = self._plan[self._next]
        got_dtype = str(tensor.dtype).replace("torch.", "")
        if name != pname or got_dtype != pdtype or tuple(tensor.shape) != tuple(pshape):
            raise ValueError(f"{self.path.name}: expected {pname} {pdtype} {list(pshape)}, "
                             f"got {name} {got_dtype} {list(tensor.shape)}")
        self.write_pieces(name, [tensor], None)

    def close(self) -> Path:
        if self._next != len(self._plan):
            raise ValueError(f"{self.path.name}: {len(self._plan) - self._next} planned tensors were not written")
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
