"""Secrets never leak; no path from an index, manifest or S3 key escapes its root; pickles never run code."""

import json
import subprocess
from pathlib import Path

from conftest import error_line, run_cli, upload_folder

STANDIN = Path(__file__).parent / "standins" / "trtllm-build"
SECRET = "hf_TopSecretToken_0123456789"


def all_text(*roots: Path) -> str:
    out = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and p.stat().st_size < 5_000_000:
                out.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def test_token_never_written_or_printed(hub_env, model_factory, tmp_path, s3_env, s3_client, s3_prefix):
    hub_env.add("org/private-model", model_factory(), token=SECRET)
    proc = run_cli("-v", "trtllm", "org/private-model", "--token", SECRET, "--work-dir", tmp_path / "work",
                   "--output", tmp_path / "out", "--trtllm-build", STANDIN, "--upload", s3_prefix)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in all_text(tmp_path / "work", tmp_path / "out")
    manifest = s3_client.get_object(Bucket="models", Key=s3_prefix.split("models/", 1)[1] + "lmi-compile-manifest.json")
    body = manifest["Body"].read().decode()
    assert SECRET not in body and s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in body
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in proc.stderr


def test_s3_index_cannot_point_outside_prefix(s3_client, s3_prefix, model_copy, tmp_path):
    m = model_copy(shards=2)
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "../../../etc/model-00001-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    upload_folder(s3_client, m, s3_prefix)
    proc = run_cli("fetch", s3_prefix, "--output", tmp_path / "o")
    assert proc.returncode == 2 and "outside the model folder" in error_line(proc)
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "o" / "../../../etc").resolve().glob("model-*"))  # where the index pointed


def test_push_refuses_symlink_out_of_tree(tmp_path, s3_env, s3_prefix):
    tree = tmp_path / "art"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (tree / "rank0.engine").symlink_to(secret)
    proc = run_cli("push", tree, s3_prefix)
    assert proc.returncode == 2 and "outside" in error_line(proc)


def test_remote_code_never_runs_without_trust(hub_env, model_copy, tmp_path):
    m = model_copy()
    marker = tmp_path / "ran"
    (m / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (m / "config.json").write_text(json.dumps(cfg))
    for args in (["fetch", m], ["trtllm", m, "--work-dir", tmp_path / "w", "--until", "convert"]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "--trust-remote-code" in error_line(proc)
    assert not marker.exists()


def test_a_hub_fetch_runs_no_module_of_the_current_folder(hub_env, model_factory, tmp_path):
    """The Hub download and the Neuron compile entry point run in child Pythons: `python -m` would put the current
    folder first on their sys.path, so a json.py (a cloned repository, a trusted model's code) there would run as
    the user. The installed command, from such a folder, runs none."""
    import sys

    command = Path(sys.executable).parent / "lmi-compile"
    hub_env.add("org/plain", model_factory())
    ran = tmp_path / "ran"
    for name in ("json", "signal", "threading"):
        (tmp_path / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write({name!r})\n")
    proc = subprocess.run([str(command), "fetch", "org/plain", "--output", "out"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not ran.exists(), ran.read_text()
    # the Neuron compile entry point is started the same way (here it finds no Neuron SDK, and says so)
    proc = subprocess.run([str(command), "neuron", "out", "--work-dir", "w", "--output", "o"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Neuron compile unavailable" in error_line(proc), proc.stderr
    assert not ran.exists(), ran.read_text()
