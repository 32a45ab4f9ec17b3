"""The reference's per-sample work (`LazySupervisedDataset.__getitem__` of LLaVA-NeXT's train.py for
an `llava_llama_3` + `anyres` record), rewritten without torch for a throughput baseline:

- the image: `Image.open(...).convert("RGB")`, then `process_anyres_image` (llava/mm_utils.py):
  `select_best_resolution`, `resize_and_pad_image`, `divide_to_patches`, the base image squashed to
  336x336, and `CLIPImageProcessor.preprocess` on every tile (resize, centre crop, rescale, normalise;
  NumPy arrays instead of torch tensors);
- the text: `preprocess_llama3`: a deep copy of the tokenizer with `<image>` added, the system turn and
  every turn rendered with `apply_chat_template` and tokenised one by one, labels masked per role.

It follows the spec (../shared/spec/llava-next-reference.md sections 1-3); it is a cost model, not a
test oracle (the goldens in fixtures/ are that).

    python python/reference_getitem.py datasets.toml [--workers 1 16] [--repeat 3]

Prints samples/s for the mixture's records, in one process and in a pool of --workers processes
(as a DataLoader's workers would), beside ShardDataset's figure from python/bench.py.
"""

import argparse
import copy
import json
import math
import multiprocessing
import time
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
          "that the user provides, and assist the user with a variety of tasks using natural language.")
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


def select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        dw, dh = int(original_width * scale), int(original_height * scale)
        effective = min(dw * dh, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def resize_and_pad_image(image, target):
    ow, oh = image.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    resized = image.resize((nw, nh))
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def divide_to_patches(image, size):
    w, h = image.size
    return [image.crop((j, i, j + size, i + size)) for i in range(0, h, size) for j in range(0, w, size)]


def process_anyres_image(image, processor, pinpoints):
    best = select_best_resolution(image.size, pinpoints)
    patches = divide_to_patches(resize_and_pad_image(image, best), processor.crop_size["height"])
    edge = processor.size["shortest_edge"]
    tiles = [image.resize((edge, edge))] + patches
    return np.stack([processor.preprocess(t, return_tensors="np")["pixel_values"][0] for t in tiles])


def preprocess_llama3(conversations, tokenizer, has_image, deepcopy=True):
    if deepcopy:
        tokenizer = copy.deepcopy(tokenizer)  # what the reference does, per sample (~1 s)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    roles = {"human": "user", "gpt": "assistant"}
    if roles.get(conversations[0]["from"]) != "user":
        conversations = conversations[1:]
    ids = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}])
    labels = [IGNORE_INDEX] * len(ids)
    for turn in conversations:
        role = roles.get(turn["from"], turn["from"])
        enc = tokenizer.apply_chat_template([{"role": role, "content": turn["value"]}])[1:]
        ids += enc
        labels += [IGNORE_INDEX] * len(enc) if role in ("user", "system") else enc
    unmask = {128000, 128006, 128007, 128009}
    for i, t in enumerate(ids):
        if t in unmask:
            labels[i] = t
        if t == image_id:
            ids[i] = IMAGE_TOKEN_INDEX
    return ids, labels


def move_image_first(value):
    if "<image>" in value:
        value = "<image>\n" + value.replace("<image>", "").strip()
    return value


_STATE = {}


def _init(tokenizer_dir, deepcopy=True):
    from transformers import AutoTokenizer, CLIPImageProcessor

    _STATE["deepcopy"] = deepcopy
    _STATE["tok"] = AutoTokenizer.from_pretrained(tokenizer_dir)
    _STATE["proc"] = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def getitem(job):
    record, folder, pinpoints = job
    conv = [dict(t) for t in record["conversations"]]
    pixels = None
    if "image" in record:
        with Image.open(Path(folder) / record["image"]) as f:
            image = f.convert("RGB")
        pixels = process_anyres_image(image, _STATE["proc"], pinpoints)
        conv[0]["value"] = move_image_first(conv[0]["value"])
    ids, labels = preprocess_llama3(conv, _STATE["tok"], "image" in record, _STATE["deepcopy"])
    return len(ids), 0 if pixels is None else pixels.shape[0]


def jobs(config_path):
    config_path = Path(config_path)
    with open(config_path, "rb") as f:
        cfg = tomllib.load(f)
    base = config_path.parent
    pinpoints = [tuple(map(int, p.strip(" ()").split(","))) for p in
                 cfg["image_grid_pinpoints"].strip("[]").split("),")]
    out = []
    for src in cfg["sources"]:
        data = base / src["json"]
        text = data.read_text()
        records = [json.loads(l) for l in text.splitlines() if l.strip()] if data.suffix == ".jsonl" else json.loads(text)
        folder = base / src.get("image_folder", ".")
        out += [(r, str(folder), pinpoints) for r in records
                if isinstance(r, dict) and r.get("conversations") and (("image" not in r) or (folder / str(r["image"])).is_file())]
    return cfg, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="datasets.toml")
    p.add_argument("--tokenizer", default=".cache/tokenizer", help="folder with tokenizer.json")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-deepcopy", action="store_true",
                   help="skip the per-sample tokenizer deep copy (the reference's dominant cost)")
    args = p.parse_args()
    deep = not args.no_deepcopy
    _, todo = jobs(args.config)
    for w in args.workers:
        best = float("inf")
        for _ in range(args.repeat):
            if w == 1:
                _init(args.tokenizer, deep)
                start = time.perf_counter()
                done = [getitem(j) for j in todo]
            else:
                with multiprocessing.Pool(w, initializer=_init, initargs=(args.tokenizer, deep)) as pool:
                    start = time.perf_counter()
                    done = pool.map(getitem, todo, chunksize=1)
            best = min(best, time.perf_counter() - start)
        tiles = sum(t for _, t in done)
        print(f"reference __getitem__{'' if deep else ' without the deep copy'}, workers={w:2d}: {len(done)} samples ({tiles} tiles) in {best:.2f}s: "
              f"{len(done) / best:.1f} samples/s, {tiles / best:.1f} tiles/s")


if __name__ == "__main__":
    main()
