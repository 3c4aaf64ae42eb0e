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
    facts = _merged(section["releases"], row)
    if "toolchain" in facts and "toolchains" in section:
        # The toolchain row (one TensorRT-LLM version's interface) is shared by every release that ships it.
        facts["tool"] = {"version": facts["toolchain"],
                         **_merged(section["toolchains"], section["toolchains"][facts["toolchain"]])}
    return Target(backend, release, facts)


def toolchains(backend: str) -> dict[str, dict]:
    """Every toolchain row of a backend (e.g. each TensorRT-LLM version's trtllm-build interface), merged."""
    rows = table()[backend].get("toolchains", {})
    return {v: {"version": v, **_merged(rows, row)} for v, row in rows.items()}


def releases_with(backend: str, **facts) -> list[str]:
    """Releases whose row has all of `facts` (e.g. toolchain="0.9.0")."""
    return [r for r in releases(backend) if all(resolve(backend, r).get(k) == v for k, v in facts.items())]


def _merged(rows: dict, row: dict) -> dict:
    """A row can name another to start from (`"like": "0.30"`); its own keys win."""
    base = _merged(rows, rows[row["like"]]) if "like" in row else {}
    return {**base, **{k: v for k, v in row.items() if k != "like"}}


def _normalize(text: str) -> str:
    parts = str(text).strip().lstrip("v").split(".")
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        return f"{int(parts[0])}.{int(parts[1])}"
    raise BadInput(f"--lmi-version {text!r}: give an LMI release like 0.30")


def _key(release: str) -> tuple:
    return tuple(int(p) for p in release.split("."))
