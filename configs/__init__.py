"""Data tables (architectures, templates, instance shapes) shipped with lmi-compile."""

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_json(name: str):
    """Load one JSON table shipped in this package."""
    return json.loads(resources.files(__name__).joinpath(name).read_text())


def read_text(name: str) -> str:
    """Read one text template shipped in this package."""
    return resources.files(__name__).joinpath(name).read_text()
