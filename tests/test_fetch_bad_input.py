"""Every bad input to fetch/validation: one error line naming the file and the fix, exit 2, nothing left."""

import json
import struct
from pathlib import Path

import pytest
from conftest import error_line, run_cli, upload_folder


def assert_bad(proc, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    line = error_line(proc)
    for n in needles:
        assert n in line, line
    assert "Traceback" not in proc.stderr
    return line


def break_index(model: Path, name: str, mutate) -> None:
    idx = json.loads((model / name).read_text())
    mutate(idx["weight_map"])
    (model / name).write_text(json.dumps(idx))


def test_missing_config(model_copy):
    m = model_copy()
    (m / "config.json").unlink()
    assert_bad(run_cli("fetch", m), str(m / "config.json"), "missing", "save_pretrained")


def test_missing_tokenizer_config(model_copy):
    m = model_copy()
    (m / "tokenizer_config.json").unlink()
    assert_bad(run_cli("fetch", m), "tokenizer_config.json", "missing")


def test_no_weights(model_copy):
    m = model_copy()
    (m / "model.safetensors").unlink()
    assert_bad(run_cli("fetch", m), str(m), "no weights")


def test_index_names_missing_shard(model_copy):
    m = model_copy(shards=2)
    (m / "model-00002-of-00002.safetensors").unlink()
    assert_bad(run_cli("fetch", m), "model.safetensors.index.json", "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_outside_model_folder(model_copy, bad):
    m = model_copy(shards=2)
    break_index(m, "model.safetensors.index.json", lambda wm: wm.update({next(iter(wm)): bad}))
    assert_bad(run_cli("fetch", m), "model.safetensors.index.json", "outside")


def test_index_symlink_out_of_folder(model_copy, tmp_path):
    m = model_copy(shards=2)
    outside = tmp_path / "elsewhere.safetensors"
    (m / "model-00002-of-00002.safetensors").rename(outside)
    (m / "model-00002-of-00002.safetensors").symlink_to(outside)
    assert_bad(run_cli("fetch", m), "outside", "symlink")


def test_truncated_safetensors(model_copy):
    m = model_copy()
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_bad(run_cli("fetch", m), str(f), "truncated")


def test_header_offsets_overrun_file(model_copy):
    m = model_copy()
    f = m / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 10**9, e + 10**9]
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    assert_bad(run_cli("fetch", m), str(f), name)


def test_header_length_overruns_file(model_copy):
    m = model_copy()
    f = m / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    assert_bad(run_cli("fetch", m), str(f), "header length")


def test_index_and_shard_disagree(model_copy):
    m = model_copy(shards=2)

    def swap(wm):
        k = next(iter(wm))
        wm[k] = "model-00002-of-00002.safetensors" if wm[k].endswith("1-of-00002.safetensors") else \
            "model-00001-of-00002.safetensors"

    break_index(m, "model.safetensors.index.json", swap)
    assert_bad(run_cli("fetch", m), "does not hold it")


@pytest.mark.parametrize("repo_id,says", [("bad repo id", "not a valid Hub repo id"),
                                          ("org/na me", "not a valid Hub repo id"),
                                          # more than org/name is a path, not a repo id
                                          ("a/b/c/d--", "no local folder named a/b/c/d--"),
                                          ("org//x", "no local folder named org//x")])
def test_malformed_repo_id(repo_id, says, tmp_path):
    assert_bad(run_cli("fetch", repo_id, "--output", tmp_path / "o"), says)
    assert not (tmp_path / "o").exists()


def test_revision_does_not_exist(hub_env, model_factory, tmp_path):
    hub_env.add("org/rev", model_factory())
    assert_bad(run_cli("fetch", "org/rev", "--revision", "no-such-branch", "--output", tmp_path / "o"),
               "no-such-branch", "--revision")
    assert not (tmp_path / "o").exists()


def test_hub_404_and_401(hub_env, model_factory, tmp_path):
    hub_env.add("org/secret", model_factory(), token="right-token")
    hub_env.add("org/gated", model_factory(), token="right-token", gated=True)
    assert_bad(run_cli("fetch", "org/missing", "--output", tmp_path / "o"), "org/missing", "not found")
    line = assert_bad(run_cli("fetch", "org/secret", "--token", "wrong-token", "--output", tmp_path / "o"),
                      "org/secret", "--token")
    assert "wrong-token" not in line
    # an interrupted fetch of the gated model, rerun without access: what it downloaded stays for the rerun that
    # has it (BadSetting), as with rejected S3 credentials
    staging = tmp_path / ".o.partial"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    assert_bad(run_cli("fetch", "org/gated", "--output", tmp_path / "o"), "gated", "HF_TOKEN")
    assert not (tmp_path / "o").exists() and (staging / "config.json").is_file()


def test_hub_index_names_missing_shard(hub_env, model_copy, tmp_path):
    m = model_copy(shards=2)
    (m / "model-00001-of-00002.safetensors").unlink()
    hub_env.add("org/broken", m)
    assert_bad(run_cli("fetch", "org/broken", "--output", tmp_path / "o"), "model-00001-of-00002.safetensors")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial"))


def test_s3_prefix_without_objects(s3_env, s3_prefix, tmp_path):
    assert_bad(run_cli("fetch", s3_prefix, "--output", tmp_path / "o"), s3_prefix, "no objects")
    assert not (tmp_path / "o").exists()


def test_s3_bucket_does_not_exist(s3_env, tmp_path):
    assert_bad(run_cli("fetch", "s3://no-such-bucket-here/m/", "--output", tmp_path / "o"), "no-such-bucket-here",
               "bucket does not exist")


def test_s3_no_credentials(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert_bad(run_cli("fetch", "s3://models/x/", "--output", tmp_path / "o"), "no AWS credentials")


def test_s3_bad_credentials(s3_env, s3_client, s3_prefix, model_factory, tmp_path, monkeypatch):
    """Rejected credentials are one line, and the rerun that fixes them resumes: what an interrupted fetch had
    downloaded stays (it was deleted: a rerun with an expired session token lost hours of download)."""
    from lmi_compile.remote.s3 import download_files, list_objects, make_client, parse_s3_uri

    upload_folder(s3_client, model_factory(), s3_prefix)
    client, u, mtimes = make_client(), parse_s3_uri(s3_prefix), {}
    objects = list_objects(client, u, mtimes)
    staging = tmp_path / ".o.partial"  # as an interrupted fetch leaves it: its finished files named
    download_files(client, u, ["config.json"], staging, objects, desc="d", mtimes=mtimes)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    line = assert_bad(run_cli("fetch", s3_prefix, "--output", tmp_path / "o"), "credentials were rejected")
    assert "not-the-secret" not in line
    assert (staging / "config.json").is_file() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("uri,needle", [
    ("s3://", "'' is not a valid S3 bucket name"),
    ("s3://UPPER/x/", "'UPPER' is not a valid S3 bucket name"),
    ("s3://b/../x/", "'b' is not a valid S3 bucket name"),
    ("s3://models/../x/", "'.' and '..' are not allowed in an S3 prefix"),  # a valid bucket: the prefix rule decides
    ("s3://models/a/./b/", "'.' and '..' are not allowed in an S3 prefix"),
    ("gs://bucket/x/", "unsupported URI scheme"),
])
def test_malformed_uris(uri, needle, tmp_path):
    assert_bad(run_cli("fetch", uri, "--output", tmp_path / "o"), uri, needle)
    assert not (tmp_path / "o").exists()


def test_s3_model_without_tokenizer_config(s3_client, s3_prefix, model_copy, tmp_path):
    m = model_copy()
    (m / "tokenizer_config.json").unlink()
    upload_folder(s3_client, m, s3_prefix)
    assert_bad(run_cli("fetch", s3_prefix, "--output", tmp_path / "o"), "tokenizer_config.json is missing")
    assert not (tmp_path / "o").exists()


def test_pickle_with_code_is_refused(model_copy, tmp_path):
    import pickle

    m = model_copy(fmt="bin")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"model.embed_tokens.weight": Evil()}, m / "pytorch_model.bin", pickle_module=pickle)
    # torch >= 2.6 defaults to weights_only=True, LMI containers ship older torch: make the default unsafe, as
    # there, so only an explicit weights_only=True in lmi-compile keeps the pickle from running
    proc = run_cli("fetch", m, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert not marker.exists(), "the pickle ran code"
    assert_bad(proc, "pytorch_model.bin", "refused", "safetensors")


def test_custom_code_via_auto_map(model_copy):
    m = model_copy()
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (m / "config.json").write_text(json.dumps(cfg))
    assert_bad(run_cli("fetch", m), "auto_map", "--trust-remote-code")


def safetensors_file(path: Path, header, data_bytes: int, *, length: int | None = None) -> Path:
    """A safetensors file with this header (its length field `length` when given) and `data_bytes` zero bytes."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + b"\0" * data_bytes)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# header, data bytes, header length field (None: the real one), words of the refusal. Each header lies in one way
# that a reader trusting it would turn into wrong weights or a crash: checked in process, the header alone.
LYING_HEADERS = {
    "not-an-object": ([1, 2], 0, None, ["not a JSON object"]),
    "unknown-dtype": ({"w": entry("Q4_K", [2], 0, 1)}, 1, None, ["unsupported dtype 'Q4_K'"]),
    "negative-dimension": ({"w": entry("F32", [0, -1], 0, 0)}, 0, None, ["negative dimension"]),
    "span-shorter-than-shape": ({"w": entry("F32", [2], 0, 4)}, 8, None, ["do not match its shape [2]"]),
    "negative-offset": ({"w": entry("F32", [1], -4, 0)}, 4, None, ["offsets -4..0"]),
    "one-byte-short": ({"w": entry("F32", [2], 0, 8)}, 7, None, ["ends at byte 8", "holds 7 data bytes"]),
    "one-byte-overlap": ({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 1, 3)}, 3, None, ["overlap"]),
    "length-past-the-end": ({"w": entry("U8", [1], 0, 1)}, 0, 32, ["header length 32 overruns"]),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_a_lying_safetensors_header_is_refused(tmp_path, case):
    from lmi_compile.errors import BadInput
    from lmi_compile.model.checkpoint import read_safetensors_header

    header, data_bytes, length, words = LYING_HEADERS[case]
    if length is not None:  # the length field says 8 bytes more than the file holds after it
        length = len(json.dumps(header).encode()) + 1
        words = [f"header length {length} overruns"]
    f = safetensors_file(tmp_path / "model.safetensors", header, data_bytes, length=length)
    with pytest.raises(BadInput) as e:
        read_safetensors_header(f)
    assert str(e.value).startswith(f"{f}: ")
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("weight_map,words", [({}, ["no weight_map"]),
                                              ({"model.norm.weight": 3}, ["'model.norm.weight' is not a file name"])])
def test_an_index_without_usable_weight_map(model_copy, weight_map, words):
    from lmi_compile.errors import BadInput
    from lmi_compile.model.validate import validate_model_dir

    m = model_copy(shards=2)
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(BadInput) as e:
        validate_model_dir(m)
    assert str(e.value).startswith(f"{m / 'model.safetensors.index.json'}: ")
    for w in words:
        assert w in str(e.value)


def test_pickles_that_hold_no_state_dict_or_nothing(model_copy):
    """A .bin of other things than named tensors, and a zero-byte one (a download that failed): one line each."""
    import torch

    from lmi_compile.errors import BadInput
    from lmi_compile.model.validate import validate_model_dir

    m = model_copy(fmt="bin")
    f = m / "pytorch_model.bin"
    for write, words in ((lambda: torch.save([torch.zeros(2)], f), "expected a state dict of tensors, found list"),
                         (lambda: torch.save({"model.norm.weight": 3}, f), "entry 'model.norm.weight' is not a tensor"),
                         (lambda: f.write_bytes(b""), "cannot read PyTorch checkpoint")):
        write()
        with pytest.raises(BadInput) as e:
            validate_model_dir(m)
        assert str(e.value).startswith(f"{f}: ") and words in str(e.value), str(e.value)


def test_a_checkpoint_without_tensors(model_copy):
    from lmi_compile.errors import BadInput
    from lmi_compile.model.validate import validate_model_dir

    m = model_copy()
    safetensors_file(m / "model.safetensors", {"__metadata__": {"format": "pt"}}, 0)
    with pytest.raises(BadInput, match="model.safetensors: holds no tensors"):
        validate_model_dir(m)
