"""Where a checkpoint's bytes are, and reads of them that do not grow resident memory.

Safetensors tensors are described as byte ranges of their files, so row slices can be copied
file-to-file in the kernel (copy_file_range) without passing through this process. Anything that must
pass through memory (row-parallel slices, dtype casts) is read with positional reads into one reused
block buffer. Nothing is mmapped: touched mmap pages stay resident for the life of the mapping, which
for a full pass is the whole model. PyTorch pickles have no offsets, so they go through torch's own
mmap loader.
"""

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lmi_compile.model.checkpoint import Checkpoint, TensorInfo
from lmi_compile.model.dtypes import itemsize

BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileRange:
    """`numel` elements of `dtype` stored contiguously at `offset` in `path`."""

    path: Path
    offset: int
    numel: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Zeros:
    numel: int


class ByteBudget:
    """Bytes of tensors parallel workers may hold at once; a request above the limit waits to run alone."""

    def __init__(self, limit: int):
        self.limit, self.used = max(1, limit), 0
        self._cv = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        n = min(n, self.limit)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


class TensorReader:
    def __init__(self, checkpoint: Checkpoint, block_bytes: int = BLOCK_BYTES):
        self.ck = checkpoint
        self.block_bytes = block_bytes
        self._fds: dict = {}
        self._scratch: torch.Tensor | None = None

    def info(self, name: str) -> TensorInfo:
        return self.ck.tensors[name]

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def row_elems(self, name: str) -> int:
        n = 1
        for d in self.info(name).shape[1:]:
            n *= d
        return n

    def row_range(self, name: str, start: int, stop: int):
        """Rows [start, stop) as a FileRange (safetensors) or a tensor view (pickles)."""
        info = self.info(name)
        if info.offset is None:
            t = self.ck.get(name)
            return t[start:stop] if t.dim() else t
        per_row = self.row_elems(name)
        if not info.shape:
            return FileRange(info.file, info.offset, 1, info.dtype)
        return FileRange(info.file, info.offset + start * per_row * itemsize(info.dtype), (stop - start) * per_row,
                         info.dtype)

    def _fill(self, rng: FileRange, buf: torch.Tensor) -> None:
        view = memoryview(buf.view(torch.uint8).numpy())
        fd, pos, n = self.fd(rng.path), 0, rng.nbytes
        while pos < n:
            got = os.preadv(fd, [view[pos:]], rng.offset + pos)
            if got <= 0:
                raise OSError(f"{rng.path}: unexpected end of file at byte {rng.offset + pos}")
            pos += got

    def read(self, rng: FileRange) -> torch.Tensor:
        """Read a range into the reused scratch buffer; the result is valid until the next read."""
        n = rng.nbytes
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(max(n, self.block_bytes), dtype=torch.uint8)
        self._fill(rng, self._scratch[:n])
        return self._scratch[:n].view(getattr(torch, rng.dtype))

    def read_owned(self, name: str) -> torch.Tensor:
        """The whole tensor in its own exact-size storage (for torch.save, which writes whole storages)."""
        info = self.info(name)
        if info.offset is None:
            return self.ck.get(name).clone()
        out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        if out.numel():
            self._fill(FileRange(info.file, info.offset, out.numel(), info.dtype), out.view(-1))
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a tensor (scratch-backed for safetensors: use before the next read)."""
        r = self.row_range(name, start, stop)
        if isinstance(r, torch.Tensor):
            return r
        return self.read(r).reshape([stop - start, *self.info(name).shape[1:]])

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor (scratch-backed for safetensors: clone it to keep it past the next read)."""
        info = self.info(name)
        if not info.shape:
            return self.rows(name, 0, 1).reshape(())
        return self.rows(name, 0, info.shape[0])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._scratch = None
