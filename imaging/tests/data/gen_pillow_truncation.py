"""Regenerate pillow_truncation.json: what Pillow 10.3.0 (LOAD_TRUNCATED_IMAGES left False) does
with every fixture image cut at several points: accepted (with the SHA-256 of the
`convert("RGB")` bytes) or refused (with its message). Needs `pip install pillow==10.3.0 numpy`.
Usage: python3 gen_pillow_truncation.py <repo>/fixtures/images > pillow_truncation.json"""
import hashlib, io, json, os, sys
from PIL import Image
import numpy as np

root = sys.argv[1]
files = sorted(os.path.relpath(os.path.join(dp, f), root)
               for dp, _, fs in os.walk(root) for f in fs if not f.endswith((".md", ".json")))
out = []
for rel in files:
    data = open(os.path.join(root, rel), "rb").read()
    n = len(data)
    cuts = sorted({n // 8, n // 4, n // 2, n * 9 // 10, n - 1, n - 3, n - 4, n - 12, n - 13, n - 16, n - 17, n - 100})
    for cut in cuts:
        if cut <= 0:
            continue
        e = dict(file=rel, cut=cut)
        try:
            im = Image.open(io.BytesIO(data[:cut]))
            a = np.ascontiguousarray(np.asarray(im.convert("RGB")))
            e["ok"] = True
            e["rgb_sha256"] = hashlib.sha256(a.tobytes()).hexdigest()
        except Exception as ex:  # refused: the message says why
            e["ok"] = False
            e["error"] = f"{type(ex).__name__}: {ex}"
        out.append(e)
print("[\n" + ",\n".join(json.dumps(e) for e in out) + "\n]")
