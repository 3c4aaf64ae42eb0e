"""Write safetensors files one tensor at a time.

The header is computed from the planned names, dtypes and shapes before any data exists, so a rank file
of many GB is written with at most one row block in memory; byte ranges of source files are copied by
the kernel (copy_file_range) without entering this process. The file appears under its final name only
when complete (temporary name, fsync, rename).

Each tensor's bytes start going to disk as soon as the tensor is written (start_writeback), so the disk works
while the convert does and the closing fsync only waits for the tail. Left to the kernel, a rank file's pages
stay dirty until that fsync (background writeback starts at 10% of memory dirty): on the 16-core host the fsync
of an 11 GB tp=2 convert took 6.0 of its 13.4 s, and 7.5 of 19.1 s converting from S3, where the fetched
shards' writeback competed with it; started per tensor, 11.9 and 11.7 s.
"""

import ctypes
import functools
import json
import os
import struct
import sys
from pathlib import Path

import torch

from lmi_compile.model.dtypes import ST_DTYPE_SIZE, TORCH_TO_ST, itemsize

from lmi_compile.converters.tensor_reader import BLOCK_BYTES, FileRange, Zeros


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait for it


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux only; Python's os module lacks it), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing these bytes of `fd` to disk, without waiting for them (a ctypes call: the
    GIL is released, and a full device queue holds only this thread). Where it is missing or refused (another
    OS, a filesystem without it) nothing changes: close() still fsyncs."""
    fn = _sync_file_range()
    if fn is not None and nbytes > 0:
        fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


class SafetensorsWriter:
    """One safetensors file. Tensor i lives at a fixed offset known from the plan, so tensors may be written
    in any order and from several threads at once (positional writes only)."""

    def __init__(self, path: Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        """`plan`: (name, torch dtype name, shape) in file order."""
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._plan = list(plan)
        self._sizes, self._begins = [], []
        self._written = [False] * len(self._plan)
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
            self._begins.append(offset)
            offset += n
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the safetensors library does
        self._data_start = 8 + len(blob)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(struct.pack("<Q", len(blob)) + blob, 0)
            os.ftruncate(self._fd, self._data_start + self.data_bytes)
        except BaseException:  # an interrupt or a full disk here must not leave the temporary behind
            self.abort()
            raise

    def _pwrite(self, data, pos: int) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], pos + done)
        return done

    def _copy_range(self, rng: FileRange, pos: int, read_range) -> int:
        """Copy a source byte range to `pos`, in the kernel when the platform allows."""
        left, off, dst = rng.nbytes, rng.offset, pos
        if hasattr(os, "copy_file_range"):
            src = os.open(rng.path, os.O_RDONLY)
            try:
                while left:
                    n = os.copy_file_range(src, self._fd, min(left, 1 << 30), off, dst)
                    if n <= 0:
                        break
                    left, off, dst = left - n, off + n, dst + n
            except OSError as e:
                if e.errno == 28:  # ENOSPC is real; other errors mean "not supported here"
                    raise
            finally:
                os.close(src)
        while left:
            chunk = min(left, BLOCK_BYTES)
            self._pwrite(read_range(FileRange(rng.path, off, chunk, "uint8")).numpy(), dst)
            left, off, dst = left - chunk, off + chunk, dst + chunk
        return rng.nbytes

    def _write_tensor(self, t: torch.Tensor, dtype: torch.dtype, pos: int) -> int:
        t = t.to(dtype).contiguous()
        return self._pwrite(t.view(-1).view(torch.uint8).numpy(), pos) if t.numel() else 0

    def write_pieces_at(self, i: int, pieces, read_range) -> None:
        """Write planned tensor i from its pieces (FileRange, Zeros or tensors), casting as needed.

        `read_range(FileRange) -> tensor` reads a range into memory (only when a cast is needed).
        Safe to call from several threads for different i.
        """
        _, pdtype, _ = self._plan[i]
        dtype = getattr(torch, pdtype)
        size = itemsize(pdtype)
        start = pos = self._data_start + self._begins[i]
        for piece in pieces:
            if isinstance(piece, FileRange) and piece.dtype == pdtype:
                pos += self._copy_range(piece, pos, read_range)
            elif isinstance(piece, FileRange):
                per_block = max(1, BLOCK_BYTES // itemsize(piece.dtype))
                for first in range(0, piece.numel, per_block):
                    n = min(per_block, piece.numel - first)
                    sub = FileRange(piece.path, piece.offset + first * itemsize(piece.dtype), n, piece.dtype)
                    pos += self._write_tensor(read_range(sub), dtype, pos)
            elif isinstance(piece, Zeros):
                left = piece.numel * size
                zeros = bytes(min(left, BLOCK_BYTES))
                while left:
                    pos += self._pwrite(zeros[:min(left, len(zeros))], pos)
                    left -= min(left, len(zeros))
            else:
                pos += self._write_tensor(piece, dtype, pos)
        if pos - start != self._sizes[i]:
            raise ValueError(f"{self.path.name}: tensor {self._plan[i][0]} got {pos - start} bytes, "
                             f"planned {self._sizes[i]}")
        start_writeback(self._fd, start, pos - start)
        self._written[i] = True

    def write_pieces(self, name: str, pieces, read_range) -> None:
        """Write the next planned tensor, in file order."""
        if name != self._plan[self._next][0]:
            raise ValueError(f"{self.path.name}: expected tensor {self._plan[self._next][0]}, got {name}")
        self.write_pieces_at(self._next, pieces, read_range)
        self._next += 1

    def write(self, name: str, tensor) -> None:
        """Write the next planned tensor from one in-memory tensor (dtype and shape must match the plan)."""
        pname, pdtype, pshape = self._plan[self._next]
        got_dtype = str(tensor.dtype).replace("torch.", "")
        if name != pname or got_dtype != pdtype or tuple(tensor.shape) != tuple(pshape):
            raise ValueError(f"{self.path.name}: expected {pname} {pdtype} {list(pshape)}, "
                             f"got {name} {got_dtype} {list(tensor.shape)}")
        self.write_pieces(name, [tensor], None)

    def close(self) -> Path:
        missing = self._written.count(False)
        if missing:
            raise ValueError(f"{self.path.name}: {missing} planned tensors were not written")
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        else:
            self.abort()
