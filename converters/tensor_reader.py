"""Read whole tensors or row ranges of a checkpoint with plain positional reads.

Safetensors files are not mmapped here: touched mmap pages count against the process's resident
memory for as long as the mapping lives, which for a full pass over a model is the whole model.
Positional reads into a fresh buffer keep resident memory to the tensors in hand. PyTorch pickles
go through torch's own mmap loader (they have no offsets we could read).
"""

import os

import torch

from lmi_compile.checkpoint import Checkpoint, TensorInfo


class TensorReader:
    def __init__(self, checkpoint: Checkpoint):
        self.ck = checkpoint
        self._fds: dict = {}

    def info(self, name: str) -> TensorInfo:
        return self.ck.tensors[name]

    def _fd(self, info: TensorInfo) -> int:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return fd

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (the whole tensor for 0-d)."""
        info = self.info(name)
        if info.offset is None:
            t = self.ck.get(name)
            return t[start:stop].clone() if t.dim() else t.clone()
        shape = list(info.shape)
        dtype = getattr(torch, info.dtype)
        elsize = torch.empty((), dtype=dtype).element_size()
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        if not shape:
            start, stop, shape = 0, 1, [1]
        n = (stop - start) * row_elems * elsize
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos, off = 0, info.offset + start * row_elems * elsize
        fd = self._fd(info)
        while pos < n:
            got = os.preadv(fd, [view[pos:]], off + pos)
            if got <= 0:
                raise OSError(f"{info.file}: unexpected end of file reading {name}")
            pos += got
        out = buf.view(dtype).reshape([stop - start, *shape[1:]])
        return out.reshape(info.shape) if not info.shape else out

    def full(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.rows(name, 0, info.shape[0] if info.shape else 1)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
