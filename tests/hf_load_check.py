"""Loads a llava-trainer checkpoint with HF transformers and runs one forward pass.

    python tests/hf_load_check.py CHECKPOINT_DIR   (used by tests/recipe.rs)

Prints the loading info (empty: no missing/unexpected keys), how many saved tensors differ from
the loaded model's (handles the legacy → >= 4.52 / 5.x key renames) and whether logits are finite.
"""
import sys, torch
from transformers import LlavaNextForConditionalGeneration, AutoConfig
from safetensors.torch import load_file
ck = sys.argv[1]
m, info = LlavaNextForConditionalGeneration.from_pretrained(ck, torch_dtype=torch.float32, output_loading_info=True)
print("loading info", {k: v for k, v in info.items() if v})
sd = load_file(f"{ck}/model.safetensors")
# every saved tensor landed in the model unchanged (legacy keys remapped by transformers)
msd = m.state_dict()
def find(k):
    for cand in (k, "model." + k, k.replace("language_model.model.", "model.language_model."),
                 k.replace("language_model.lm_head", "lm_head"), "model." + k.replace("language_model.model.", "language_model."),
                 "model." + k.replace("vision_tower.vision_model.", "vision_tower.")):
        if cand in msd: return msd[cand]
    raise KeyError(k)
bad = [k for k, v in sd.items() if not torch.equal(find(k), v)]
print("tensors", len(sd), "mismatched", len(bad), bad[:3])
ids = torch.tensor([[128000, 9906, 1917]])
out = m(input_ids=ids)
print("logits", tuple(out.logits.shape), "finite", bool(torch.isfinite(out.logits).all()))
import transformers; print("transformers", transformers.__version__)
