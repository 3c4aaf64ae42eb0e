"""serving.properties: read LMI settings users already have, and write the one a layout needs."""

import logging
import os
import re
from pathlib import Path

from lmi_compile.errors import BadInput

log = logging.getLogger("lmi_compile")

# LMI option name -> (lmi-compile setting, converter). The table is the whole mapping.
LMI_OPTIONS = {
    "model_id": ("model", str),
    "tensor_parallel_degree": ("tp", int),
    "pipeline_parallel_degree": ("pp", int),
    "max_rolling_batch_size": ("max_batch_size", int),
    "max_input_len": ("max_input_len", int),
    "max_output_len": ("max_output_len", int),
    "max_seq_len": ("max_seq_len", int),
    "max_num_tokens": ("max_num_tokens", int),
    "dtype": ("dtype", str),
    "trust_remote_code": ("trust_remote_code", lambda v: v.strip().lower() == "true"),
    "n_positions": ("n_positions", int),
    "context_length_estimate": ("context_length_estimate", str),  # neuron: its --context-length-estimate
    "revision": ("revision", str),
}
LMI_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "auto": "auto",
              "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
TO_LMI_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def parse(data: bytes, where: str) -> dict[str, str]:
    """The settings of a serving.properties as LMI reads them: java.util.Properties.load of the file's bytes
    (djl-serving@0.33.0-dlc:wlm/src/main/java/ai/djl/serving/wlm/ModelInfo.java l.844-845), so ISO-8859-1; '#' and
    '!' comment lines; a key ends at the first unescaped '=', ':' or blank, and blanks with one '=' or ':' among them
    separate it from the value; a line ending in an odd number of backslashes goes on to the next; \\uXXXX, \\t,
    \\n, \\r, \\f escape. (Values lose trailing blanks here; Java keeps them.)"""
    text = data.decode("latin-1")
    lines = re.split(r"\r\n|\r|\n", text)  # Java's line ends only (str.splitlines also splits at \x85 and \f)
    out, i = {}, 0
    while i < len(lines):
        n, line = i + 1, lines[i].lstrip(" \t\f")
        i += 1
        if not line or line[0] in "#!":
            continue
        while (len(line) - len(line.rstrip("\\"))) % 2 and i < len(lines):
            line, i = line[:-1] + lines[i].lstrip(" \t\f"), i + 1
        end = re.match(r"(?:[^\\=: \t\f]|\\.)*", line).end()
        value = re.sub(r"^[ \t\f]*[=:]?[ \t\f]*", "", line[end:], count=1)
        try:
            out[_unescape(line[:end])] = _unescape(value).rstrip()
        except ValueError:
            raise BadInput(f"{where}:{n}: cannot parse {line[:60]!r}: \\u must be followed by four hex digits "
                           f"(LMI's Properties.load refuses the file too)") from None
    return out


def _unescape(s: str) -> str:
    def one(m):
        c = m.group(1)
        if c == "u":
            raise ValueError(m.group(0))
        return chr(int(c[1:], 16)) if len(c) == 5 else {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(c, c)

    # a character beyond U+FFFF comes as two \\u escapes (Java strings are UTF-16): joined here
    return re.sub(r"\\(u[0-9a-fA-F]{4}|u|.)", one, s).encode("utf-16-le", "surrogatepass").decode("utf-16-le",
                                                                                                 "surrogatepass")


def _escape(value: str) -> str:
    """`value` as Properties.load reads it back (Properties.store's escapes): backslashes doubled, a leading blank
    and every character outside printable ASCII as \\uXXXX, so an S3 prefix or path in any script survives LMI's
    ISO-8859-1 reading."""
    def one(m):
        b = m.group().encode("utf-16-be")
        return "".join(f"\\u{int.from_bytes(b[i:i + 2], 'big'):04x}" for i in range(0, len(b), 2))

    out = re.sub(r"[^\x20-\x7e]", one, value.replace("\\", "\\\\"))
    return "\\u0020" + out[1:] if out.startswith(" ") else out


def lmi_settings(properties: Path | None, environ=os.environ) -> dict:
    """Settings from a serving.properties file, overridden by OPTION_* / HF_MODEL_ID environment variables."""
    raw: dict[str, str] = {}
    source: dict[str, str] = {}
    if properties is not None:
        try:
            data = Path(properties).read_bytes()
        except OSError as e:
            raise BadInput(f"{properties}: cannot read ({e.strerror})") from None
        for k, v in parse(data, str(properties)).items():
            if k.startswith("option."):
                raw[k[len("option."):]], source[k[len("option."):]] = v, str(properties)
    for k, v in environ.items():
        if k.startswith("OPTION_"):
            raw[k[len("OPTION_"):].lower()], source[k[len("OPTION_"):].lower()] = v, k
    if environ.get("HF_MODEL_ID"):
        raw["model_id"] = environ["HF_MODEL_ID"]
    out = {}
    for name, value in raw.items():
        if name not in LMI_OPTIONS:
            # said, not dropped in silence: the serving.properties a layout writes is made from the settings alone
            log.warning("option.%s=%s (from %s): not a setting lmi-compile compiles with; the serving.properties "
                        "it writes does not carry it", name, value, source[name])
            continue
        key, conv = LMI_OPTIONS[name]
        try:
            out[key] = conv(value)
        except ValueError:
            # named as the user wrote it (a file's key or the environment variable); an ahead-of-time compile fixes
            # every number, so LMI's `max` (all the GPUs it finds when it serves) cannot stand for one
            what = source[name] if source[name].startswith("OPTION_") else f"{source[name]}: option.{name}"
            want = "a whole number" + (" (LMI resolves `max` when it serves; a compile needs the degree itself)"
                                       if value.strip().lower() == "max" else "")
            raise BadInput(f"{what}={value!r} is not valid; give {want}") from None
    if "dtype" in out:
        if out["dtype"] not in LMI_DTYPES:
            raise BadInput(f"{properties or 'environment'}: option.dtype={out['dtype']!r}; use fp16, bf16 or fp32")
        out["dtype"] = LMI_DTYPES[out["dtype"]]
    return out


LENGTH_SETTINGS = {"input": "max_input_len", "output": "max_output_len", "seq": "max_seq_len"}


def reinterpret_lengths(settings: dict, lengths: dict) -> dict:
    """Length options mean different things per LMI release (configs/targets.json `properties.lengths`:
    0.30-0.32's option.max_output_len is the whole sequence); give `settings` their meaning for the target."""
    out = dict(settings)
    for option, meaning in lengths.items():
        key = LMI_OPTIONS[option][0]
        if key in settings and key != LENGTH_SETTINGS[meaning]:
            out.pop(key)
            out[LENGTH_SETTINGS[meaning]] = settings[key]
    return out


def render(options: dict, *, engine: str | None = None, comments: list[str] = ()) -> str:
    lines = [f"# {c}" for c in comments]
    if engine:
        lines.append(f"engine={engine}")
    for k, v in options.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        lines.append(f"option.{k}={_escape(str(v))}")
    return "\n".join(lines) + "\n"
