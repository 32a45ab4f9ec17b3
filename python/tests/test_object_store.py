"""ShardDataset reading from a bucket (issue 30): the example build served by a real S3 server
process (s3s-fs on 127.0.0.1, installed by scripts/setup.sh) gives the same batches as the Rust
loader reading the local files. Fails (never skips) when s3s-fs is missing."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import llava_data

from test_dataset import check_equal

KEY, SECRET, BUCKET = "py-access-key", "py-secret-key", "llava"


def s3s_fs():
    candidates = [os.environ.get("LLAVA_S3S_FS"), shutil.which("s3s-fs"),
                  str(Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "s3s-fs")]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    pytest.fail("s3s-fs (the S3 server this test starts) is missing: run scripts/setup.sh, or "
                "`cargo install --locked s3s-fs --version 0.14.1 --features binary`, or set LLAVA_S3S_FS")


@pytest.fixture(scope="module")
def bucket(shards, tmp_path_factory):
    """s3://llava/example: a copy of the example build in an s3s-fs root; the AWS_* variables
    set for the duration of the module."""
    root = tmp_path_factory.mktemp("s3-root")
    shutil.copytree(shards, root / BUCKET / "example")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [s3s_fs(), "--host", "127.0.0.1", "--port", str(port), "--access-key", KEY,
         "--secret-key", SECRET, str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "s3s-fs listens"
            time.sleep(0.05)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"s3://{BUCKET}/example"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.kill()
    server.wait()


def test_bucket_batches_equal_the_rust_loader(bucket, rust_batches):
    rust = rust_batches()
    ds = llava_data.ShardDataset(bucket, workers=2)
    batches = list(ds)
    assert len(batches) == len(rust) > 0
    for py, r in zip(batches, rust):
        check_equal(py, r)


def test_bucket_with_wrong_credentials_names_the_variable(bucket):
    os.environ["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    try:
        with pytest.raises(Exception) as e:
            llava_data.ShardDataset(bucket.replace("example", "other"))
        assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and "refused" in str(e.value)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
