"""The fast S3 fetch path against a real server (SeaweedFS): ranged GETs streamed from the socket, hashed per
upload part as they arrive, and a file named only once its bytes match the manifest."""

import hashlib
import signal
from pathlib import Path

import pytest
from conftest import PausedCli, error_line, run_cli

from lmi_compile.remote.manifest import MANIFEST_KEY
from lmi_compile.remote.s3 import parse_s3_uri

# ~23 MB in two shards of ~11 MiB: with 5 MiB parts each shard is a 3-part multipart upload, and one GET
# (RANGE_BYTES) covers several parts, so part boundaries fall inside a streamed range.
MULTIPART = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_size=1024, vocab_size=4000)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def published(s3_env, s3_prefix, model_factory):
    """A model pushed with lmi-compile (so the prefix carries a manifest) in 5 MiB parts."""
    model = model_factory(shards=2, **MULTIPART)
    proc = run_cli("push", model, s3_prefix, "--part-size-mb", "5")
    assert proc.returncode == 0, proc.stderr
    return model, s3_prefix


def test_fetch_verifies_every_byte_against_the_manifest(published, s3_client, tmp_path):
    model, prefix = published
    out = tmp_path / "out"
    proc = run_cli("fetch", prefix, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert digests(out) == digests(model)
    # Same size, other bytes: what a republish without its manifest, or corruption at rest, looks like.
    u = parse_s3_uri(prefix)
    shard = "model-00002-of-00002.safetensors"
    body = bytearray((model / shard).read_bytes())
    body[len(body) // 2] ^= 0xFF
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=bytes(body))
    bad = tmp_path / "bad"
    proc = run_cli("fetch", prefix, "--output", bad)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert shard in line and "do not match the upload manifest's checksum" in line
    assert not bad.exists() or not (bad / shard).exists()
    assert not list(tmp_path.rglob(f".{shard}.tmp-*")), "a file that failed its checksum must not remain"


def test_interrupted_fetch_resumes_and_rechecks_kept_files(published, tmp_path):
    model, prefix = published
    out = tmp_path / "out"
    # held before the 2nd ranged GET of the weights (6 small files come first, one GET each): not all is in
    run = PausedCli("fetch", prefix, "--output", out, point="fetch-range#8", tmp_path=tmp_path)
    rc, err = run.signal(signal.SIGINT)
    assert rc == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    staging = tmp_path / ".out.partial"
    assert not list(staging.rglob("*.tmp-*")) and not out.exists()
    # a kept file that no longer matches the manifest (same size) is fetched again, not trusted on its size
    kept = staging / "config.json"
    assert kept.is_file()
    kept.write_bytes(kept.read_bytes().replace(b"{", b" ", 1))
    again = run_cli("fetch", prefix, "--output", out)
    assert again.returncode == 0, again.stderr
    assert digests(out) == digests(model)


def test_stream_that_drops_mid_range_is_retried(published, s3_env, tmp_path):
    """A connection that ends early mid-range: the range is fetched again and the file is still verified."""
    from lmi_compile.remote.fetch import _manifest_objects
    from lmi_compile.remote.s3 import download_files, list_objects, make_client

    model, prefix = published
    client, u = make_client(), parse_s3_uri(prefix)
    objects = list_objects(client, u)
    drops = {"n": 0}

    class Dropping:
        """get_object whose first two bodies end after 1 MiB."""

        def get_object(self, **kw):
            resp = client.get_object(**kw)
            if drops["n"] < 2 and resp["ContentLength"] > 1 << 20:
                drops["n"] += 1
                real = resp["Body"]
                left = {"n": 1 << 20}

                class Short:
                    def readinto(self, view):
                        if left["n"] <= 0:
                            return 0
                        k = real.readinto(view[:left["n"]])
                        left["n"] -= k
                        return k

                    def close(self):
                        real.close()

                resp["Body"] = Short()
            return resp

    weights = sorted(k for k in objects if k.endswith(".safetensors"))
    download_files(Dropping(), u, weights, tmp_path / "d", objects, desc="d", expect=_manifest_objects(client, u))
    assert drops["n"] == 2
    assert digests(tmp_path / "d") == {k: v for k, v in digests(model).items() if k in weights}


def test_bodies_are_read_straight_from_the_socket(published, s3_env):
    """The shipped path reads the HTTP response under botocore's body (no copy through urllib3); if a botocore
    or urllib3 upgrade moves it, downloads stay correct through the public API but slower: this says so."""
    from lmi_compile.remote.s3 import _raw_readinto, make_client

    _, prefix = published
    u = parse_s3_uri(prefix)
    body = make_client().get_object(Bucket=u.bucket, Key=u.key(MANIFEST_KEY))["Body"]
    readinto = _raw_readinto(body)
    assert type(readinto.__self__).__module__ == "http.client"
    body.close()
