"""Command-line values without pydantic: start-up time of every command.

typer 0.29 coerces each given argument through a pydantic TypeAdapter, which imports pydantic and builds a schema
per parameter: 0.13 s of `lmi-compile fetch` here and 0.15 s on the 16-core host, a fifth of a command whose
transfer s5cmd finishes in 0.13 s. Our parameters are plain str, bool, int (with min/max) and Path with typer's default
path checks, so a valid value is taken as is here; any other annotation, and every value that is not plainly
valid, goes to typer's own coercion, so its error messages stay typer's. typer releases without these internals
(before 0.29 they coerced with click, without pydantic) are left untouched.
"""

import os
import re
from pathlib import Path

_INT = re.compile(r"[+-]?[0-9]+")
# typer's defaults for a Path parameter: no check beyond "readable, if it exists"
_PATH_DEFAULTS = dict(exists=False, file_okay=True, dir_okay=True, writable=False, readable=True, resolve_path=False,
                      allow_dash=False, path_type=None, parser=None)


def install() -> None:
    try:
        from dataclasses import dataclass

        from typer import _coercion, core

        param_class, base = core._TyperParameter, core._TyperParameter.get_runtime_param
    except (ImportError, AttributeError):
        return

    @dataclass(frozen=True)
    class Plain(_coercion.RuntimeParam):
        def _coerce_value(self, value, param, ctx):
            plain = _plain(self.annotation, self.parameter_info, value)
            if plain is not None:
                return plain
            return _coercion.build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    def get_runtime_param(self):
        desc = self.type_descriptor
        if self._runtime_param is None and _handled(desc.annotation, desc.parameter_info):
            self._runtime_param = Plain(parameter_info=desc.parameter_info, annotation=desc.annotation)
        return base(self)

    param_class.get_runtime_param = get_runtime_param


def _handled(annotation, info) -> bool:
    if getattr(info, "parser", None) is not None:
        return False
    if annotation in (str, bool):
        return True
    if annotation is int:
        return not getattr(info, "clamp", False)
    if annotation is Path:
        return all(getattr(info, k, None) == v for k, v in _PATH_DEFAULTS.items())
    return False


def _plain(annotation, info, value):
    """The value, when it is plainly valid for the annotation; None sends it to typer's coercion."""
    if annotation is str:
        return value if isinstance(value, str) else None
    if annotation is bool:  # a flag's value (--help's is None until given: typer builds its coercion all the same)
        return value if isinstance(value, bool) else None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None
        if isinstance(value, str):
            if not _INT.fullmatch(value):
                return None
            value = int(value)
        if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
            return None
        return value
    if annotation is Path and isinstance(value, (str, Path)):
        # typer refuses an existing path it cannot read; leave that (rare) case to its message
        if os.path.exists(value) and not os.access(value, os.R_OK):
            return None
        return Path(value)
    return None
