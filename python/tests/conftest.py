"""Fixtures: the bundled example mixture (datasets.toml) built by `llava-data build`, and the Rust
loader's own batches (python/examples/dump_batches.rs) to compare the package with.

Which `llava_data` is tested: by default the extension module that cargo builds into the
workspace's target dir (`cargo build --workspace --lib --bin llava-data --bin llava-trainer --example dump_batches`,
run here first; after `cargo test --workspace` it has nothing left to compile) is put first on sys.path, so the tests
never test a stale install. LLAVA_PY_INSTALLED=1 tests the installed package instead
(`pip install ./python`, `maturin develop`); LLAVA_PY_NO_BUILD=1 skips the cargo step;
LLAVA_DATA_BIN names another `llava-data` binary.

Needs the tokenizer that scripts/setup.sh fetches (.cache/tokenizer/, or LLAVA_TOKENIZER).
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
if not TARGET.is_absolute():
    TARGET = ROOT / TARGET
LLAVA_DATA = Path(os.environ.get("LLAVA_DATA_BIN", TARGET / "debug" / "llava-data"))
DUMP = TARGET / "debug" / "examples" / "dump_batches"
MODULE = TARGET / "debug" / "libllava_data_py.so"

if os.environ.get("LLAVA_PY_NO_BUILD") != "1":
    # --workspace with an example: the same feature resolution as `cargo test --workspace`
    # (all members, dev-dependencies on), so after it nothing is rebuilt. --lib puts the
    # module at target/debug/ (cargo test builds it only as the example's dependency).
    subprocess.run(
        ["cargo", "build", "--quiet", "--locked", "--workspace", "--lib", "--bin", "llava-data",
         "--bin", "llava-trainer", "--example", "dump_batches"],
        cwd=ROOT, check=True,
    )
if os.environ.get("LLAVA_PY_INSTALLED") != "1":
    _module_dir = Path(tempfile.mkdtemp(prefix="llava-data-py-"))
    atexit.register(shutil.rmtree, _module_dir, ignore_errors=True)
    (_module_dir / "llava_data.abi3.so").symlink_to(MODULE)
    sys.path.insert(0, str(_module_dir))


@pytest.fixture(scope="session")
def example_config():
    with open(ROOT / "datasets.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, example_config):
    """The example mixture's shards, built once per test session."""
    tokenizer = Path(os.environ.get("LLAVA_TOKENIZER", ROOT / example_config["tokenizer"]))
    if not tokenizer.is_file():
        pytest.fail(f"{tokenizer} is missing: run scripts/setup.sh (it fetches the tokenizer)")
    out = tmp_path_factory.mktemp("example") / "shards"
    config = tmp_path_factory.getbasetemp() / "datasets.toml"
    text = (ROOT / "datasets.toml").read_text()
    # Same mixture from a copy of the config: paths made absolute (they are relative to the
    # config's folder), the tokenizer's so that LLAVA_TOKENIZER is honoured.
    text = text.replace(f'tokenizer = "{example_config["tokenizer"]}"', f'tokenizer = "{tokenizer}"', 1)
    text = text.replace('"fixtures/', f'"{ROOT}/fixtures/')
    config.write_text(text)
    subprocess.run(
        [str(LLAVA_DATA), "build", str(config), "--output", str(out)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def rust_batches(shards):
    """rust_batches(**options) -> the Rust loader's batches (dicts) for those options."""
    cache = {}

    def run(world_size=1, rank=0, seed=42, epoch=0, u8=False, state=None, batch_size=None, pack_length=None,
            across=False):
        key = (world_size, rank, seed, epoch, u8, json.dumps(state, sort_keys=True), batch_size, pack_length, across)
        if key not in cache:
            cmd = [str(DUMP), "--shards", str(shards), "--world-size", str(world_size),
                   "--rank", str(rank), "--seed", str(seed), "--epoch", str(epoch)]
            if u8:
                cmd.append("--u8")
            if state is not None:
                cmd += ["--state", json.dumps(state)]
            if batch_size is not None:
                cmd += ["--batch-size", str(batch_size)]
            if pack_length is not None:
                cmd += ["--pack-length", str(pack_length)]
            if across:
                cmd.append("--pack-across-batches")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            cache[key] = [json.loads(line) for line in out.splitlines()]
        return cache[key]

    return run


@pytest.fixture(scope="session")
def goldens():
    """(json file, index) -> the reference pipeline's golden row (llava_llama_3, anyres)."""
    rows = {}
    with open(ROOT / "fixtures" / "golden" / "golden.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["template"] == "llava_llama_3" and r["status"] == "ok":
                rows[(r["file"], r["index"])] = r
    return rows
