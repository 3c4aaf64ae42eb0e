"""Path rules shared by every stage: nothing named by an index, manifest or S3 key escapes its root."""

import os
from pathlib import Path, PurePosixPath

from lmi_compile.errors import BadInput


def safe_relpath(name: str, *, what: str) -> PurePosixPath:
    """Return `name` as a relative POSIX path, refusing absolute paths and `..` parts."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise BadInput(f"{what}: path {name!r} points outside its folder; only plain relative names are allowed")
    return p


def resolve_inside(root: Path, name: str, *, what: str) -> Path:
    """Join `name` under `root` and make sure the real path (symlinks followed) stays inside it."""
    rel = safe_relpath(name, what=what)
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / rel))
    if target != root_real and root_real not in target.parents:
        if root_real.parent.name == "snapshots" and target.parent == root_real.parent.parent / "blobs":
            # a huggingface_hub cache snapshot: its files are links into the same repo's blobs/ (named by hash:
            # the link's path is kept, since callers name files by it)
            return Path(root) / rel
        raise BadInput(f"{what}: {name!r} resolves to {target}, outside {root_real} (a symlink out of the folder); "
                       f"give a folder that holds its files, e.g. a copy made with cp -rL")
    return target


def dir_is_empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())
