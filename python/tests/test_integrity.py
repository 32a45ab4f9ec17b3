"""Row checksums through the Python reader: bytes flipped in a built shard's tile data stop the
iteration with the shard, row group, row and sample named; on_corrupt="skip" leaves the sample
out and lists it. (The token-id case and training are tested in tests/integrity.rs.)"""

import re
import shutil

import pytest

import llava_data

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def flip_inside_a_tile(shard):
    """Flips 64 bytes in the middle of the largest stretch between two zstd frame starts of the
    image shard: inside one `raw` tile value (a zstd frame stored without Parquet compression),
    so Parquet decodes the row as before and only the row checksum can tell."""
    data = bytearray(shard.read_bytes())
    starts = [m.start() for m in re.finditer(re.escape(ZSTD_MAGIC), data)]
    gaps = [(b - a, a) for a, b in zip(starts, starts[1:])]
    size, start = max(gaps)
    assert size > 1024, "a tile frame"
    mid = start + size // 2
    for i in range(mid - 32, mid + 32):
        data[i] ^= 0xA5
    shard.write_bytes(bytes(data))


@pytest.fixture
def corrupt_shards(shards, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(shards, copy)
    image = max((copy / "shards").iterdir(), key=lambda p: p.stat().st_size)
    flip_inside_a_tile(image)
    return copy, image


def test_a_flipped_tile_stops_with_its_location(corrupt_shards):
    copy, image = corrupt_shards
    ds = llava_data.ShardDataset(copy, workers=2, normalize=False)
    with pytest.raises(RuntimeError) as err:
        for _ in ds:
            pass
    msg = str(err.value)
    pattern = re.escape(str(image)) + r' row group \d+ row \d+: sample \w+#\d+ \(id ".*"\): row checksum [0-9a-f]{16}, the shard says [0-9a-f]{16}'
    assert re.search(pattern, msg), msg
    assert "--on-corrupt skip" in msg


def test_skip_leaves_the_sample_out_and_lists_it(shards, corrupt_shards):
    copy, image = corrupt_shards
    clean = [tuple(i) for b in llava_data.ShardDataset(shards, workers=2, normalize=False) for i in b["ids"]]
    ds = llava_data.ShardDataset(copy, workers=2, normalize=False, on_corrupt="skip")
    seen, skipped = [], []
    for b in ds:
        assert b["input_ids"].shape[0] == len(b["ids"]), "one row per remaining sample"
        seen += [tuple(i) for i in b["ids"]]
        skipped += b["skipped"]
    assert len(skipped) == 1 and str(image) in skipped[0], skipped
    match = re.search(r"sample (\w+)#(\d+) \(id \"(.*)\"\)", skipped[0])
    lost = (match[1], int(match[2]), match[3])
    assert lost in clean and lost not in seen
    assert sorted(seen) == sorted(i for i in clean if i != lost)


def test_on_corrupt_must_be_stop_or_skip(shards):
    with pytest.raises(ValueError, match="use stop or skip"):
        llava_data.ShardDataset(shards, on_corrupt="ignore")
