"""llava_data.ShardDataset against the Rust loader, the reference goldens, resume and workers."""

import hashlib
import threading
import time

import numpy as np
import pytest

import llava_data

S = 336


def pixels_sha(batch):
    """SHA-256 of the batch's real tiles in order (the dummy images of text samples excluded)."""
    h = hashlib.sha256()
    for img, modality in zip(batch["images"], batch["modalities"]):
        if modality == "image":
            h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def summary(batch):
    """Everything of a batch, hashable: to compare runs with each other."""
    return (
        tuple(batch["ids"]),
        batch["input_ids"].tobytes(),
        batch["labels"].tobytes(),
        batch["attention_mask"].tobytes(),
        tuple(batch["image_sizes"]),
        tuple(batch["modalities"]),
        tuple(i.shape for i in batch["images"]),
        pixels_sha(batch),
        batch["tokens"],
    )


def check_equal(py, rust, normalize=True):
    """One Python batch against the Rust loader's dump of the same batch."""
    b, L = rust["rows"], rust["seq_len"]
    assert [list(i) for i in py["ids"]] == rust["ids"]
    for key, dtype in (("input_ids", np.int64), ("labels", np.int64), ("attention_mask", np.bool_)):
        assert py[key].dtype == dtype, key
        assert py[key].shape == (b, L), key
        assert py[key].flags.c_contiguous
    assert py["input_ids"].ravel().tolist() == rust["input_ids"]
    assert py["labels"].ravel().tolist() == rust["labels"]
    assert py["attention_mask"].astype(np.uint8).ravel().tolist() == rust["attention_mask"]
    assert py["lengths"].tolist() == rust["lengths"]
    assert py["rows"] == rust["row_samples"] and py["segments"] == rust["segments"]
    # Right padding, by length: mask = the first lengths[i] positions; pad id 0, label -100.
    for i, n in enumerate(rust["lengths"]):
        assert py["attention_mask"][i, :n].all() and not py["attention_mask"][i, n:].any()
        assert (py["input_ids"][i, n:] == llava_data.PAD_ID).all()
        assert (py["labels"][i, n:] == llava_data.IGNORE_INDEX).all()
    real = [(img, size) for img, size, m in zip(py["images"], py["image_sizes"], py["modalities"]) if m == "image"]
    assert [[w, h, img.shape[0]] for img, (w, h) in real] == rust["images"]
    dtype = np.float32 if normalize else np.uint8
    for img in py["images"]:
        assert img.dtype == dtype and img.shape[1:] == (3, S, S)
    # One image entry per placeholder, plus the reference's dummy for each sample without one.
    placeholders = int((py["input_ids"] == -200).sum())
    assert len(real) == placeholders
    dummies = [img for img, m in zip(py["images"], py["modalities"]) if m == "text"]
    for img in dummies:
        assert img.shape == (1, 3, S, S) and not img.any()
    assert len(py["images"]) == len(py["image_sizes"]) == len(py["modalities"])
    assert pixels_sha(py) == rust["pixels_sha256"]
    assert py["tokens"] == rust["tokens"]


@pytest.fixture(scope="module")
def epoch_f32(shards):
    ds = llava_data.ShardDataset(shards, workers=2)
    batches, states = [], []
    for batch in ds:
        batches.append(batch)
        states.append(ds.state_dict())
    return batches, states


def test_batches_equal_the_rust_loader(epoch_f32, rust_batches):
    batches, states = epoch_f32
    rust = rust_batches()
    assert len(batches) == len(rust) > 5
    for py, r, state in zip(batches, rust, states):
        check_equal(py, r)
        assert state == r["next_state"]
    modalities = {m for b in batches for m in b["modalities"]}
    assert modalities == {"image", "text"}, "the example has image and text batches"


@pytest.fixture(scope="module")
def epoch_u8(shards):
    """One epoch with uint8 tiles (no normalisation: the cheap pass for the order tests)."""
    return list(llava_data.ShardDataset(shards, workers=2, normalize=False))


def test_uint8_batches_equal_the_rust_loader(epoch_u8, rust_batches):
    rust = rust_batches(u8=True)
    batches = epoch_u8
    assert len(batches) == len(rust)
    for py, r in zip(batches, rust):
        check_equal(py, r, normalize=False)


def test_pixels_are_views_of_one_buffer(epoch_f32):
    batches, _ = epoch_f32
    multi = [b for b in batches if sum(m == "image" for m in b["modalities"]) > 1]
    assert multi
    for b in multi:
        real = [img for img, m in zip(b["images"], b["modalities"]) if m == "image"]
        assert all(not img.flags.owndata for img in real), "tiles were copied"
        assert all(img.flags.c_contiguous for img in real)
        base = real[0].base
        while getattr(base, "base", None) is not None and isinstance(base.base, np.ndarray):
            base = base.base
        assert all(np.shares_memory(img, base) for img in real)


def test_world_size_two_equals_rust_and_covers_every_sample_once(shards, rust_batches):
    seen = []
    lengths = set()
    for rank in range(2):
        ds = llava_data.ShardDataset(shards, rank=rank, world_size=2, workers=2)
        batches = list(ds)
        rust = rust_batches(world_size=2, rank=rank)
        assert len(batches) == len(rust)
        lengths.add(len(batches))
        for py, r in zip(batches, rust):
            check_equal(py, r)
            seen += [tuple(i[:2]) for i in py["ids"]]
    assert len(lengths) == 1, "ranks take the same number of steps"
    assert len(seen) == len(set(seen)) == llava_data.ShardDataset(shards).num_samples


def test_packed_batches_equal_the_rust_loader(shards, rust_batches, epoch_f32):
    with pytest.raises(ValueError, match="packing=True"):
        llava_data.ShardDataset(shards, pack_length=8192)
    with pytest.raises(ValueError, match="pack length 100"):
        llava_data.ShardDataset(shards, packing=True, pack_length=100)
    packed = list(llava_data.ShardDataset(shards, workers=2, packing=True))  # 8192: model_max_length
    rust = rust_batches(pack_length=8192)
    assert len(packed) == len(rust) == len(epoch_f32[0])
    assert any(len(r) > 1 for b in packed for r in b["rows"]), "nothing was packed"
    for py, r, unpacked in zip(packed, rust, epoch_f32[0]):
        check_equal(py, r)
        assert sorted(py["ids"]) == sorted(unpacked["ids"]), "packing changes rows, not samples"
        assert sorted(i for row in py["rows"] for i in row) == list(range(len(py["ids"])))
        assert [sum(s) for s in py["segments"]] == py["lengths"].tolist()


def test_cross_batch_packed_batches_equal_the_rust_loader(shards, rust_batches, epoch_f32):
    with pytest.raises(ValueError, match="pack_across_batches=True"):
        llava_data.ShardDataset(shards, pack_length=8192)
    across = list(llava_data.ShardDataset(shards, workers=2, pack_across_batches=True))  # 8192

    rust = rust_batches(pack_length=8192, across=True)
    assert len(across) == len(rust)
    # Fuller rows than one batch at a time: fewer of them for the same samples.
    per_batch = list(llava_data.ShardDataset(shards, workers=2, packing=True))
    assert sum(len(b["rows"]) for b in across) < sum(len(b["rows"]) for b in per_batch)
    for py, r in zip(across, rust):
        check_equal(py, r)
        assert [sum(s) for s in py["segments"]] == py["lengths"].tolist()
    # Every sample of the epoch once.
    ids = sorted(tuple(i) for b in across for i in b["ids"])
    assert ids == sorted(tuple(i) for b in epoch_f32[0] for i in b["ids"])
    # A copy for a spawned DataLoader worker (pickled before iterating) keeps the mode.
    import pickle
    fresh = llava_data.ShardDataset(shards, workers=2, pack_across_batches=True)
    copy = pickle.loads(pickle.dumps(fresh))
    assert [summary(b) for b in copy] == [summary(b) for b in across]


def source_files(config):
    return {s["name"]: s["json"].rsplit("/", 1)[-1] for s in config["sources"]}


@pytest.mark.parametrize("normalize", [True, False])
def test_pixels_and_tokens_equal_the_reference_goldens(goldens, example_config, normalize, epoch_f32, epoch_u8):
    files = source_files(example_config)
    batches = epoch_f32[0] if normalize else epoch_u8
    key = "pixels_float32_sha256" if normalize else "pixels_uint8_sha256"
    pixels_checked = tokens_checked = 0
    for b in batches:
        images = iter(zip(b["images"], b["image_sizes"], b["modalities"]))
        for row, (source, index, _id) in enumerate(b["ids"]):
            golden = goldens.get((files[source], index))
            n = int(b["lengths"][row])
            ids = b["input_ids"][row, :n].tolist()
            n_images = ids.count(-200)
            mine = [next(images) for _ in range(max(n_images, 1))]
            if golden is None or golden["returned_index"] != index:
                continue
            assert ids == golden["input_ids"], (source, index)
            assert b["labels"][row, :n].tolist() == golden["labels"], (source, index)
            tokens_checked += 1
            # The reference's image slots, its text dummy included: modality, size, tiles, pixels.
            assert len(mine) == len(golden["images"]), (source, index)
            for (img, size, modality), g in zip(mine, golden["images"]):
                assert modality == g["modality"]
                assert list(size) == g["image_size"]
                if modality == "text":
                    assert img.shape == (1, 3, S, S) and not img.any()
                    continue
                assert img.shape[0] == g["num_tiles"]
                if g.get(key):
                    assert hashlib.sha256(img.tobytes()).hexdigest() == g[key], (source, index)
                    pixels_checked += 1
    assert tokens_checked >= 30
    assert pixels_checked >= 25


def test_resume_through_state_dict_gives_exactly_the_remaining_batches(shards, epoch_u8, rust_batches):
    full = [summary(b) for b in epoch_u8]
    for k in (1, 4, len(full) - 1):
        ds = llava_data.ShardDataset(shards, workers=3, normalize=False)
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = ds.state_dict()
        assert len(ds) == len(full) - k
        del ds, it  # a new process, as after a restart
        resumed = llava_data.ShardDataset(shards, workers=3, normalize=False)
        resumed.load_state_dict(state)
        assert len(resumed) == len(full) - k
        rest = [summary(b) for b in resumed]
        assert rest == full[k:]
        rust = rust_batches(state=state, u8=True)
        assert [r["ids"] for r in rust] == [[list(i) for i in b[0]] for b in rest]
        assert [r["pixels_sha256"] for r in rust] == [b[7] for b in rest]
        # After the last batch the state is the start of the next epoch.
        assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 0


def test_restarting_iteration_continues_where_it_stopped(shards, epoch_u8):
    full = [summary(b) for b in epoch_u8]
    ds = llava_data.ShardDataset(shards, workers=4, normalize=False)
    first = [summary(next(iter(ds))) for _ in range(3)]  # iter() keeps the position
    assert first == full[:3]
    assert [summary(b) for b in ds] == full[3:]
    with pytest.raises(StopIteration):
        next(ds)  # an ended iteration stays ended


def test_sixteen_workers_give_the_same_batches_as_one(shards, epoch_f32):
    one = [summary(b) for b in llava_data.ShardDataset(shards, workers=1)]
    sixteen = [summary(b) for b in llava_data.ShardDataset(shards, workers=16)]
    assert one == sixteen == [summary(b) for b in epoch_f32[0]]


def test_epochs_follow_each_other_and_reshuffle(shards, rust_batches):
    ds = llava_data.ShardDataset(shards, workers=2, normalize=False)
    n0 = len(ds)
    epoch0 = [tuple(b["ids"]) for b in ds]
    assert ds.epoch == 1 and len(ds) == n0
    epoch1 = [tuple(b["ids"]) for b in ds]
    assert [[list(i) for i in ids] for ids in epoch1] == [r["ids"] for r in rust_batches(epoch=1, u8=True)]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    ds.set_epoch(0)
    assert [tuple(b["ids"]) for b in ds] == epoch0


def test_the_gil_is_released_while_waiting(shards):
    ds = llava_data.ShardDataset(shards, workers=1, prefetch=1)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    try:
        start = time.perf_counter()
        for _ in ds:
            pass
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        t.join()
    # With the GIL held during each wait the ticker would stall for whole batches.
    gaps = np.diff(ticks)
    assert elapsed > 0.05
    assert gaps.max() < max(0.5, elapsed / 4), (gaps.max(), elapsed)


def test_errors_carry_the_rust_message(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        llava_data.ShardDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="batch size 3"):
        llava_data.ShardDataset(shards, batch_size=3)
    with pytest.raises(ValueError, match="rank 2"):
        llava_data.ShardDataset(shards, rank=2, world_size=2)
    ds = llava_data.ShardDataset(shards, workers=1)
    next(iter(ds))
    state = ds.state_dict()
    with pytest.raises(KeyError, match="posiiton"):
        ds.load_state_dict({**state, "posiiton": 1})
    with pytest.raises(KeyError, match="missing field"):
        ds.load_state_dict({k: v for k, v in state.items() if k != "anchor"})
    with pytest.raises(TypeError):
        ds.load_state_dict({**state, "epoch": -1})
    other_seed = llava_data.ShardDataset(shards, seed=7, workers=1)
    with pytest.raises(ValueError, match="seed 42"):
        other_seed.load_state_dict(state)
    assert other_seed.state_dict()["position"] == 0, "a refused state changes nothing"
    # A shard cut short is named when the dataset opens.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shards").mkdir()
    (broken / "manifest.json").write_text((shards / "manifest.json").read_text())
    for f in (shards / "shards").iterdir():
        data = f.read_bytes()
        (broken / "shards" / f.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=r"shards/.*\.parquet"):
        llava_data.ShardDataset(broken)


def test_the_module_under_test_is_this_build():
    import os
    from conftest import MODULE

    if os.environ.get("LLAVA_PY_INSTALLED") == "1":
        pytest.skip("testing the installed package")
    assert os.path.realpath(llava_data.__file__) == os.path.realpath(MODULE)
