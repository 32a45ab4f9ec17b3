"""Regenerate pillow_decode.json: SHA-256 of Pillow 10.3.0 `Image.open(p).convert("RGB")` bytes
for every fixture image (plus derived truncated/low-bit cases). Needs `pip install pillow==10.3.0 numpy`.
Usage: python3 gen_pillow_decode.py <repo>/fixtures/images > pillow_decode.json
Optional: ORACLE_RAW_DIR=/tmp/oracle also writes the raw RGB arrays (for diff diagnostics)."""
import hashlib, json, os, sys
from PIL import Image, ImageFile
import numpy as np

ImageFile.LOAD_TRUNCATED_IMAGES = True
root = sys.argv[1]
raw_dir = os.environ.get("ORACLE_RAW_DIR")
files = sorted(os.path.relpath(os.path.join(dp, f), root)
               for dp, _, fs in os.walk(root) for f in fs if not f.endswith((".md", ".json")))
out = []
for rel in files:
    im = Image.open(os.path.join(root, rel))
    mode = im.mode
    a = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    e = dict(file=rel, mode=mode, width=a.shape[1], height=a.shape[0],
             rgb_sha256=hashlib.sha256(a.tobytes()).hexdigest())
    if raw_dir:
        name = rel.replace("/", "_") + ".rgb"
        a.tofile(os.path.join(raw_dir, name))
        e["raw"] = name
    out.append(e)
json.dump(out, sys.stdout, indent=1)
print()
