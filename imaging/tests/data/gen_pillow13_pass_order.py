"""Goldens for `resize_bicubic_pillow13`: sha256 of Pillow >= 13's BICUBIC resize bytes.

Pillow 13.0.0 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width (`ImagingResampleInner`, src/libImaging/Resample.c of the 13.0.0 sdist); the
reference's Pillow 10.3.0 always runs the horizontal pass first. Run with Pillow 13 (the test venv): `python gen_pillow13_pass_order.py > pillow13_pass_order.json`.
Sources: `noise` is the LCG image below (rebuilt by the Rust test), `sample1` is
fixtures/tiny-llava-next-a/images/sample1.png (50x130).
"""
import hashlib
import json
import os

import PIL
from PIL import Image

assert int(PIL.__version__.split(".")[0]) >= 13, PIL.__version__


def noise(w, h):
    # x_{n+1} = (1103515245 x_n + 12345) mod 2^31, one byte (bits 16..23) per channel value.
    x, out = 1, bytearray()
    for _ in range(w * h * 3):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append((x >> 16) & 0xFF)
    return Image.frombytes("RGB", (w, h), bytes(out))


here = os.path.dirname(os.path.abspath(__file__))
sample1 = os.path.join(here, "../../../fixtures/tiny-llava-next-a/images/sample1.png")
sources = {"noise": noise(50, 130), "sample1": Image.open(sample1).convert("RGB")}
cases = []
for name, im in sources.items():
    for size in [(56, 56), (50, 56), (80, 100), (30, 100), (56, 130), (60, 200), (20, 20), (10, 40), (10, 60)]:
        out = im.resize(size, Image.BICUBIC).tobytes()
        cases.append({"source": name, "size": list(size), "sha256": hashlib.sha256(out).hexdigest()})
print(json.dumps({"pillow": PIL.__version__, "cases": cases}, indent=1))
