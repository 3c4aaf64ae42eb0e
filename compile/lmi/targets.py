"""The target table: what each LMI release loads, per backend (configs/targets.json, the only place it lives).

An engine or NEFF loads only under the toolchain and arguments that made it, and LMI releases differ in
both. Every version difference is a row of data in configs/targets.json, chosen by `--lmi-version`;
stages read facts from the `Target` they are handed and never test a version themselves.
"""

from dataclasses import dataclass

from lmi_compile.errors import BadInput

BACKENDS = ("trtllm", "neuron")


def table() -> dict:
    from lmi_compile.configs import load_json

    return load_json("targets.json")


@dataclass(frozen=True)
class Target:
    """One LMI release as one backend sees it: `facts` is that release's row, with shared rows merged in."""

    backend: str
    release: str
    facts: dict

    def __getitem__(self, key):
        return self.facts[key]

    def get(self, key, default=None):
        return self.facts.get(key, default)

    def describe(self) -> str:
        return f"LMI {self.release} ({self.facts.get('container', self.backend)})"


def releases(backend: str) -> list[str]:
    """Supported releases, oldest first."""
    return sorted(table()[backend]["releases"], key=_key)


def default_release(backend: str) -> str:
    return table()[backend]["default"]


def resolve(backend: str, release: str | None) -> Target:
    """The target for `release` (default: the backend's newest supported release), or a BadInput naming them."""
    section = table()[backend]
    release = _normalize(release) if release else section["default"]
    row = section["releases"].get(release)
    if row is None:
        others = [b for b in BACKENDS if b != backend and release in table()[b]["releases"]]
        hint = f" (LMI {release} is a {others[0]} release)" if others else ""
        raise BadInput(f"--lmi-version {release}: no {backend} target for this LMI release{hint}; supported: "
                       f"{', '.join(releases(backend))}")
    return Target(backend, release, _merged(section, row))


def _merged(section: dict, row: dict) -> dict:
    """A release row can name a shared row (`"like": "0.30"`, or `"toolchain"` for the TensorRT-LLM
    interface many releases share); the row's own keys win."""
    base = {}
    if "like" in row:
        base = _merged(section, section["releases"][row["like"]])
    out = {**base, **{k: v for k, v in row.items() if k != "like"}}
    return out


def _normalize(text: str) -> str:
    parts = str(text).strip().lstrip("v").split(".")
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        return f"{int(parts[0])}.{int(parts[1])}"
    raise BadInput(f"--lmi-version {text!r}: give an LMI release like 0.30")


def _key(release: str) -> tuple:
    return tuple(int(p) for p in release.split("."))
