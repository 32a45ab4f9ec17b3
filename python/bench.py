"""Throughput of llava_data.ShardDataset: batches/s over whole epochs of a shard folder.

    python python/bench.py out/example [--workers 1 16] [--epochs 3] [--u8]

Each figure is the best of --repeat runs of --epochs epochs (a fresh dataset each run: the
index is opened and the workers are started inside the timing).
"""

import argparse
import time

import llava_data


def run(path, workers, epochs, normalize):
    start = time.perf_counter()
    ds = llava_data.ShardDataset(path, workers=workers, normalize=normalize)
    batches = samples = tiles = 0
    for _ in range(epochs):
        for b in ds:
            batches += 1
            samples += len(b["ids"])
            tiles += sum(i.shape[0] for i, m in zip(b["images"], b["modalities"]) if m == "image")
    return batches, samples, tiles, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--u8", action="store_true", help="uint8 tiles (normalize=False)")
    args = p.parse_args()
    for w in args.workers:
        best = min((run(args.shards, w, args.epochs, not args.u8) for _ in range(args.repeat)), key=lambda r: r[3])
        batches, samples, tiles, secs = best
        print(f"workers={w:2d}: {batches} batches ({samples} samples, {tiles} tiles) in {secs:.2f}s: "
              f"{batches / secs:.1f} batches/s, {samples / secs:.1f} samples/s, {tiles / secs:.1f} tiles/s")


if __name__ == "__main__":
    main()
