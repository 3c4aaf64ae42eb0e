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
        raise BadInput(f"{what}: {name!r} resolves to {target}, outside {root_real} (symlink out of the model folder)")
    return target


def dir_is_empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())
