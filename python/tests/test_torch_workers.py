"""ShardDataset under torch's DataLoader with worker processes: each worker takes a disjoint share
of the rank's batches (batch i of an iteration goes to worker i % num_workers), so an epoch
yields every batch once, in plan order, for any num_workers; each batch's "state" resumes
mid-epoch. Skipped when torch is not installed (the CI venv has it)."""

import pytest

import llava_data

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the DataLoader worker tests need it"
)
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402


class Batches(IterableDataset):
    """The README's wrapper: a DataLoader gives each worker its own copy of the dataset."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        for batch in self.ds:
            yield {"ids": batch["ids"], "state": batch["state"], "input_ids": batch["input_ids"]}

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)


def dataset(shards, **kw):
    return llava_data.ShardDataset(shards, workers=1, normalize=False, **kw)


def plain(shards, epoch=0):
    """The batches' sample ids of one epoch, without torch."""
    ds = dataset(shards)
    ds.set_epoch(epoch)
    return [[tuple(i) for i in b["ids"]] for b in ds]


def ids(batches):
    return [[tuple(i) for i in b["ids"]] for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2, 4])
def test_every_batch_once_per_epoch_in_plan_order(shards, num_workers):
    expected = plain(shards)
    loader = DataLoader(Batches(dataset(shards)), batch_size=None, num_workers=num_workers)
    got = list(loader)
    assert ids(got) == expected
    samples = [s for b in ids(got) for s in b]
    assert len(samples) == len(set(samples)) == dataset(shards).num_samples
    assert isinstance(got[0]["input_ids"], torch.Tensor)
    # The next epoch, as a trainer moves to it (the main process's dataset did not advance).
    loader.dataset.set_epoch(1)
    assert ids(loader) == plain(shards, epoch=1) != expected


@pytest.mark.parametrize("num_workers", [0, 2, 4])
def test_resume_from_a_batch_state_mid_epoch(shards, num_workers):
    full = list(DataLoader(Batches(dataset(shards)), batch_size=None, num_workers=num_workers))
    for k in (1, len(full) // 2, len(full) - 1):
        resumed = dataset(shards)
        resumed.load_state_dict(full[k - 1]["state"])
        assert len(resumed) == len(full) - k
        rest = list(DataLoader(Batches(resumed), batch_size=None, num_workers=num_workers))
        assert ids(rest) == ids(full[k:]), k
    # Without workers the dataset itself advances, and its state_dict() is the batch's.
    ds = dataset(shards)
    it = iter(ds)
    for _ in range(3):
        batch = next(it)
    assert ds.state_dict() == batch["state"] == full[2]["state"]


def test_persistent_workers_continue_with_the_next_epoch(shards):
    loader = DataLoader(Batches(dataset(shards)), batch_size=None, num_workers=2, persistent_workers=True)
    assert ids(loader) == plain(shards, epoch=0)
    assert ids(loader) == plain(shards, epoch=1)


def test_spawned_workers_get_a_pickled_copy(shards):
    ds = dataset(shards)
    ds.load_state_dict(next(iter(dataset(shards)))["state"])
    loader = DataLoader(Batches(ds), batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert ids(loader) == plain(shards)[1:]
