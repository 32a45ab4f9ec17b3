#!/usr/bin/env python3
"""Make a golden LLaVA-NeXT parity fixture with HF transformers (CPU, float32, eager attention).

It writes a folder in exactly the layout of `fixtures/tiny-llava-next-a/` (same files, tensor key
names, dtypes and fixture.json fields; that fixture's README describes every one of them):

    model/            config.json + model.safetensors (save_pretrained), preprocessor_config.json,
                      processor_config.json, a word-level tokenizer (word `t<n>` has id n)
    images/           sample{i}.png, the batch's images
    inputs.safetensors            input_ids, labels, attention_mask, pixel_values, image_sizes
    expected.safetensors          vision / projector / packed features, inputs_embeds, logits, loss,
                                  token_nll, first-step gradients, 3 AdamW steps of the variants
                                  full / pretrain / projector_only, the PIL-backend pixels
    trained_full_step3.safetensors  every parameter after the full variant's 3rd AdamW step
    generate.json     HF `generate` (greedy, 20 new tokens, with and without the KV cache) on
                      each sample's prompt and image (`--generate-only DIR` adds it to a folder)
    key_mapping.json  checkpoint / in-memory / llava-hf hub / original LLaVA-NeXT key of each tensor
    fixture.json      sizes, per-sample geometry, losses, reference noise (fp64 and SDPA reruns),
                      versions, file sizes and sha256
    README.md         a summary of the above

Variants:

* `a` reproduces `fixtures/tiny-llava-next-a` (same seed and sizes). The weights (torch generator
  seeded with seed+1, parameters in sorted in-memory key order) and the words (numpy RandomState
  seeded with seed+2) are regenerated bit for bit; the original generator's image drawing code was
  not shipped, so by default the images are read from the repository's copy
  (`--images-from` overrides). `--check-against fixtures/tiny-llava-next-a` then compares every
  tensor and file.
* `b` (`tiny-llava-next-b`) has different shapes wherever the model has one: 42-px tiles (3x3
  patches), a 2-layer CLIP of width 48 with 6 heads, a Llama of width 96 with 6 query / 2 KV heads
  (GQA ratio 3), MLP 200, vocabulary 400 with the image token in the middle (257), other
  pinpoints, 4 samples whose unpad trims rows, columns (with int() truncation deciding), a tiny
  upscaled image, and nothing.

Needs torch, torchvision, transformers 5.x (made with 5.24.0), safetensors, numpy and Pillow; it
is not part of CI. Usage:

    python scripts/make-parity-fixture.py --variant b --out /tmp/tiny-llava-next-b
    LLAVA_PARITY_FIXTURE=/tmp/tiny-llava-next-b cargo test -p llava-trainer --test integration
    python scripts/make-parity-fixture.py --generate-only fixtures/tiny-llava-next-a
"""

import argparse
import copy
import hashlib
import json
import math
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Words per sample: (prompt words before the image, prompt words after it, answer words); the
# answer is followed by </s>.
VARIANTS = {
    "a": {
        "name": "tiny-llava-next-a",
        "seed": 20240601,
        "tile": 56,
        "patch": 14,
        "vision_hidden": 32,
        "vision_layers": 3,
        "vision_heads": 4,
        "vision_intermediate": 128,
        "text_vocab": 320,
        "text_hidden": 64,
        "text_layers": 2,
        "text_heads": 4,
        "text_kv_heads": 2,
        "text_intermediate": 176,
        "image_token_index": 319,
        "image_grid_pinpoints_hw": [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        "samples": [
            {"image_hw": [64, 150], "words": [3, 4, 6]},
            {"image_hw": [130, 50], "words": [5, 2, 3]},
            {"image_hw": [90, 120], "words": [2, 3, 8]},
        ],
        "images_from": "fixtures/tiny-llava-next-a/images",
    },
    "b": {
        "name": "tiny-llava-next-b",
        "seed": 20250715,
        "tile": 42,
        "patch": 14,
        "vision_hidden": 48,
        "vision_layers": 2,
        "vision_heads": 6,
        "vision_intermediate": 112,
        "text_vocab": 400,
        "text_hidden": 96,
        "text_layers": 2,
        "text_heads": 6,
        "text_kv_heads": 2,
        "text_intermediate": 200,
        "image_token_index": 257,
        "image_grid_pinpoints_hw": [
            [42, 84],
            [84, 42],
            [84, 84],
            [126, 42],
            [42, 126],
            [84, 126],
            [126, 84],
        ],
        "samples": [
            # 2x3 tiles, 6x9 grid: rows trimmed to 4 (int(3.21) = 3, floor pad 1 keeps 4).
            {"image_hw": [50, 140], "words": [4, 2, 5]},
            # 3x2 tiles, 9x6 grid: columns trimmed to 4 (int(4.8) = 4; rounding would keep 6).
            {"image_hw": [150, 80], "words": [2, 5, 9]},
            # Smaller than a tile: 1x2 tiles, 3x6 grid, columns trimmed to 2.
            {"image_hw": [40, 38], "words": [6, 1, 3]},
            # 2x2 tiles, 6x6 grid: nothing trimmed.
            {"image_hw": [90, 90], "words": [1, 3, 7]},
        ],
        "images_from": None,
    },
}

PAD, BOS, EOS = 0, 1, 2
LR, BETAS, EPS, WD, STEPS = 1e-3, (0.9, 0.999), 1e-8, 0.0, 3
# Parameters whose value after each AdamW step is recorded (checkpoint names), per variant.
RECORDED_FULL = [
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_1.bias",
    "multi_modal_projector.linear_2.weight",
    "multi_modal_projector.linear_2.bias",
    "image_newline",
    "language_model.lm_head.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.k_proj.weight",
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.model.norm.weight",
    "vision_tower.embeddings.patch_embedding.weight",
    "vision_tower.embeddings.class_embedding",
    "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    "vision_tower.pre_layrnorm.weight",
]
PROJECTOR = [
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_1.bias",
    "multi_modal_projector.linear_2.weight",
    "multi_modal_projector.linear_2.bias",
]


def trainable(variant, ckpt):
    if variant == "full":
        return True
    if variant == "pretrain":
        return ckpt.startswith("multi_modal_projector.") or ckpt == "image_newline"
    return ckpt.startswith("multi_modal_projector.")


# ---------------------------------------------------------------------------------------------
# Key names


def checkpoint_key(mem):
    """transformers 5.x in-memory name -> the name save_pretrained writes."""
    if mem == "lm_head.weight":
        return "language_model.lm_head.weight"
    if mem.startswith("model.language_model."):
        return "language_model.model." + mem[len("model.language_model.") :]
    if mem.startswith("model."):
        return mem[len("model.") :]
    raise ValueError(f"unexpected parameter {mem}")


def hub_key(ckpt):
    """The llava-hf hub layout (saved by transformers 4.x)."""
    if ckpt.startswith("vision_tower."):
        return "vision_tower.vision_model." + ckpt[len("vision_tower.") :]
    return ckpt


def original_key(ckpt):
    """The original LLaVA-NeXT repo's name (inverse of convert_llava_next_weights_to_hf.py)."""
    if ckpt.startswith("vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + ckpt[len("vision_tower.") :]
    if ckpt.startswith("multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + ckpt.rsplit(".", 1)[1]
    if ckpt.startswith("multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + ckpt.rsplit(".", 1)[1]
    if ckpt == "image_newline":
        return "model.image_newline"
    if ckpt.startswith("language_model.model."):
        return "model." + ckpt[len("language_model.model.") :]
    if ckpt == "language_model.lm_head.weight":
        return "lm_head.weight"
    raise ValueError(ckpt)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, processor


def make_config(s):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    assert s["text_hidden"] % s["text_heads"] == 0
    assert s["text_heads"] % s["text_kv_heads"] == 0
    assert s["vision_hidden"] % s["vision_heads"] == 0
    assert s["tile"] % s["patch"] == 0
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_intermediate"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=s["tile"],
        patch_size=s["patch"],
        projection_dim=s["vision_hidden"],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=s["text_vocab"],
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_intermediate"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        head_dim=s["text_hidden"] // s["text_heads"],
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=s["image_token_index"],
        image_grid_pinpoints=s["image_grid_pinpoints_hw"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def init_weights(model, seed, text_hidden):
    """Not HF's init (std 0.02 makes attention almost uniform): see the fixture README."""
    import torch

    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for mem in sorted(params):
            p = params[mem]
            r = torch.randn(p.shape, generator=g)
            if mem.endswith("class_embedding") or mem.endswith("embed_tokens.weight"):
                x = r
            elif mem.endswith("position_embedding.weight"):
                x = r * 0.5
            elif mem.endswith("image_newline"):
                x = r / math.sqrt(text_hidden)
            elif p.dim() == 1 and "norm" in mem and mem.endswith("weight"):
                x = r * 0.1 + 1.0
            elif p.dim() == 1 and mem.endswith("bias"):
                x = r * 0.05
            elif p.dim() >= 2:
                x = r / math.sqrt(p[0].numel())
            else:
                raise ValueError(f"no init rule for {mem}")
            p.copy_(x)


def make_tokenizer(s):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    img = s["image_token_index"]
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for i in range(3, s["text_vocab"]):
        vocab["<image>" if i == img else f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<pad>", "<s>", "</s>", "<image>"]]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def image_processor_kwargs(s):
    t = s["tile"]
    return dict(
        size={"shortest_edge": t},
        crop_size={"height": t, "width": t},
        image_grid_pinpoints=s["image_grid_pinpoints_hw"],
        do_pad=True,
    )


def make_processor(s, tokenizer):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(**image_processor_kwargs(s)),
        tokenizer=tokenizer,
        patch_size=s["patch"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


# ---------------------------------------------------------------------------------------------
# Images and words


def hsv_to_rgb(h, sat, val):
    import numpy as np

    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p = np.full_like(h, val * (1 - sat))
    q, t = val * (1 - f * sat), val * (1 - (1 - f) * sat)
    v = np.full_like(h, val)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(table):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], axis=-1)
    return out


def draw_image(rs, h, w):
    """A diagonal hue gradient with noise and a few flat rectangles (RGB uint8)."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    angle = rs.uniform(0, 2 * math.pi)
    period = rs.uniform(40, 90)
    hue = ((xx * math.cos(angle) + yy * math.sin(angle)) / period + rs.uniform()) % 1.0
    img = hsv_to_rgb(hue, 0.7, 0.75) * 255 + rs.normal(0, 8, (h, w, 3))
    for _ in range(rs.randint(2, 5)):
        rh, rw = rs.randint(3, max(4, h // 2)), rs.randint(3, max(4, w // 2))
        y0, x0 = rs.randint(0, h - rh + 1), rs.randint(0, w - rw + 1)
        img[y0 : y0 + rh, x0 : x0 + rw] = rs.randint(0, 256, 3)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def words(rs, n, s):
    """n random word ids in [3, vocab) except the image token."""
    img = s["image_token_index"]
    ids = rs.randint(3, s["text_vocab"] - 1, n)
    return [int(i) + (1 if i >= img else 0) for i in ids]


# ---------------------------------------------------------------------------------------------
# Geometry (HF's functions, recorded per sample in fixture.json)


def geometry(s, h, w):
    from transformers.image_processing_utils import select_best_resolution

    g = s["tile"] // s["patch"]
    bh, bw = select_best_resolution((h, w), s["image_grid_pinpoints_hw"])
    rows, cols = bh // s["tile"], bw // s["tile"]
    cur_h, cur_w = rows * g, cols * g
    # HF unpad_image, on the feature grid, with the original (H, W).
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        axis, after = "height", (cur_h - 2 * pad, cur_w)
    else:
        new_w = int(round(w * (cur_h / h), 7))
        pad = (cur_w - new_w) // 2
        axis, after = "width", (cur_h, cur_w - 2 * pad)
    return {
        "image_hw": [h, w],
        "best_resolution_hw": [bh, bw],
        "tiles_rows_cols": [rows, cols],
        "num_patches_incl_base": 1 + rows * cols,
        "feature_grid_before_unpad_hw": [cur_h, cur_w],
        "unpad_axis": axis,
        "unpad_removed_per_side": pad,
        "feature_grid_after_unpad_hw": list(after),
        "base_tokens": g * g,
        "grid_tokens_incl_newlines": after[0] * (after[1] + 1),
        "num_image_tokens": g * g + after[0] * (after[1] + 1),
    }


# ---------------------------------------------------------------------------------------------
# The reference computations


def load_model(model_dir, dtype=None, attn="eager"):
    import torch
    from transformers import LlavaNextForConditionalGeneration

    m = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation=attn, dtype=torch.float32
    )
    if dtype is not None:
        m = m.to(dtype)
    return m


def model_inputs(inputs, dtype=None):
    px = inputs["pixel_values"]
    return dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=px if dtype is None else px.to(dtype),
        image_sizes=inputs["image_sizes"],
    )


def loss_fp(logits, labels):
    """HF's loss computed in the logits' dtype (used for the float64 reruns)."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def forward_goldens(model, inputs, num_patches):
    """Everything of expected.safetensors that one forward pass gives."""
    import torch
    import torch.nn.functional as F

    out = {}
    captured = {}

    def hook(_module, _args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        px = inputs["pixel_values"]
        used = torch.cat([px[i, :n] for i, n in enumerate(num_patches)], 0)
        vis = model.model.vision_tower(used, output_hidden_states=True, return_dict=True)
        out["vision.hidden_states.embeddings"] = vis.hidden_states[0]
        sel = vis.hidden_states[-2]
        out["vision.selected_layer"] = sel
        out["projector.input"] = sel[:, 1:].contiguous()
        out["projector.output"] = model.model.multi_modal_projector(sel[:, 1:])
        feats = model.model.get_image_features(
            px, inputs["image_sizes"], return_dict=True
        ).pooler_output
        for i, f in enumerate(feats):
            out[f"image_features.packed.{i}"] = f
        res = model(**model_inputs(inputs), labels=inputs["labels"])
    handle.remove()
    out["inputs_embeds"] = captured["inputs_embeds"]
    out["logits"] = res.logits
    out["loss"] = res.loss
    logits, labels = res.logits, inputs["labels"]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).reshape(labels.shape[0], -1)
    out["token_nll"] = torch.cat([nll, torch.zeros(labels.shape[0], 1)], 1)
    return out


def train_variant(model_dir, inputs, variant, dtype=None):
    """3 AdamW steps from the saved weights. Returns losses, loss after, step-1 gradients and the
    parameter values after each step (checkpoint names)."""
    import torch

    model = load_model(model_dir, dtype)
    model.train()
    names = {mem: checkpoint_key(mem) for mem, _ in model.named_parameters()}
    params = []
    for mem, p in model.named_parameters():
        t = trainable(variant, names[mem])
        p.requires_grad_(t)
        if t:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    kw = model_inputs(inputs, dtype)
    losses, steps, grads = [], [], {}
    for k in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if dtype is None:
            loss = model(**kw, labels=inputs["labels"]).loss
        else:
            # HF's loss upcasts the logits to float32; the float64 rerun keeps float64.
            loss = loss_fp(model(**kw).logits, inputs["labels"])
        losses.append(loss.detach().clone())
        loss.backward()
        if k == 0:
            grads = {
                names[mem]: (p.grad.detach().clone() if p.grad is not None else None)
                for mem, p in model.named_parameters()
                if p.requires_grad
            }
        opt.step()
        steps.append(
            {names[mem]: p.detach().clone() for mem, p in model.named_parameters()}
        )
    with torch.no_grad():
        if dtype is None:
            after = model(**kw, labels=inputs["labels"]).loss
        else:
            after = loss_fp(model(**kw).logits, inputs["labels"])
    return losses, after, grads, steps


# ---------------------------------------------------------------------------------------------


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def versions():
    import numpy
    import PIL
    import safetensors
    import tokenizers
    import torch
    import torchvision
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
    }


def build(s, out, images_from):
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    torch.set_num_threads(1)
    seed = s["seed"]
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"

    # Model: built, initialised, saved; every computation below reloads it from disk.
    config = make_config(s)
    model = LlavaNextForConditionalGeneration(config)
    init_weights(model, seed + 1, s["text_hidden"])
    model.save_pretrained(model_dir)
    # tiny-llava-next-a's model/ has no generation config (nothing here generates).
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    tokenizer = make_tokenizer(s)
    processor = make_processor(s, tokenizer)
    processor.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)
    del model

    # Images.
    (out / "images").mkdir(exist_ok=True)
    rs_img = np.random.RandomState(seed + 3)
    images = []
    for i, smp in enumerate(s["samples"]):
        h, w = smp["image_hw"]
        path = out / "images" / f"sample{i}.png"
        if images_from is not None:
            shutil.copyfile(Path(images_from) / f"sample{i}.png", path)
        else:
            Image.fromarray(draw_image(rs_img, h, w)).save(path)
        img = Image.open(path).convert("RGB")
        if img.size != (w, h):
            raise SystemExit(f"{path}: size {img.size} (W, H), expected ({w}, {h})")
        images.append(img)

    # Text: <s> pre <image> post answer </s>; the processor expands <image>.
    rs_words = np.random.RandomState(seed + 2)
    texts, answers, samples = [], [], []
    for smp in s["samples"]:
        pre, post, ans = (words(rs_words, n, s) for n in smp["words"])
        t = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
        texts.append(f"<s> {t(pre)} <image> {t(post)} {t(ans)} </s>".replace("  ", " "))
        answers.append(ans)
    enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
    input_ids = enc["input_ids"].long()
    attention_mask = enc["attention_mask"].long()
    labels = torch.full_like(input_ids, -100)
    img_id = s["image_token_index"]
    for i, (smp, ans) in enumerate(zip(s["samples"], answers)):
        n = int(attention_mask[i].sum())
        a = len(ans) + 1
        labels[i, n - a : n] = input_ids[i, n - a : n]
        assert input_ids[i, n - 1] == EOS and input_ids[i, 0] == BOS
        geo = geometry(s, *smp["image_hw"])
        pos = (input_ids[i] == img_id).nonzero().flatten().tolist()
        assert len(pos) == geo["num_image_tokens"], (len(pos), geo)
        assert pos == list(range(pos[0], pos[0] + len(pos)))
        one = processor.image_processor(images=images[i], return_tensors="pt")["pixel_values"]
        geo.update(
            {
                "prompt_len": n - a,
                "answer_len_incl_eos": a,
                "seq_len": n,
                "image_token_span": [pos[0], pos[-1] + 1],
                "processor_pixel_values_shape": list(one.shape),
            }
        )
        samples.append(geo)
    inputs = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": enc["pixel_values"].float().contiguous(),
        "image_sizes": enc["image_sizes"].long(),
    }
    save_file(inputs, out / "inputs.safetensors", metadata={"format": "pt"})
    num_patches = [g["num_patches_incl_base"] for g in samples]
    n_targets = int((labels[:, 1:] != -100).sum())

    # Forward goldens.
    model = load_model(model_dir)
    model.eval()
    expected = {
        "num_image_tokens": torch.tensor([g["num_image_tokens"] for g in samples]),
        "num_patches": torch.tensor(num_patches),
    }
    expected.update(forward_goldens(model, inputs, num_patches))
    pil = LlavaNextImageProcessorPil(**image_processor_kwargs(s))
    expected["preprocess.pixel_values_pil_backend"] = pil(images=images, return_tensors="pt")[
        "pixel_values"
    ].float()
    mem_names = [mem for mem, _ in model.named_parameters()]
    shapes = {mem: list(p.shape) for mem, p in model.named_parameters()}
    del model

    # Training: 3 AdamW steps per variant from the same weights.
    train, trained = {}, {}
    for variant in ["full", "pretrain", "projector_only"]:
        losses, after, grads, steps = train_variant(model_dir, inputs, variant)
        expected[f"train.{variant}.losses"] = torch.stack(losses)
        expected[f"train.{variant}.loss_after_steps"] = after.detach()
        train[f"{variant}_losses"] = [float(x) for x in losses]
        train[f"{variant}_loss_after"] = float(after)
        if variant == "full":
            for name, g in grads.items():
                if g is not None:
                    expected[f"grad.full.step1.{name}"] = g
            train["full_params_without_grad"] = [n for n, g in grads.items() if g is None]
            recorded = RECORDED_FULL
            trained = steps[-1]
        elif variant == "pretrain":
            for name, g in grads.items():
                expected[f"grad.pretrain.step1.{name}"] = g
            train["pretrain_trainable"] = [n for n in PROJECTOR + ["image_newline"] if n in grads]
            recorded = [n for n in RECORDED_FULL if trainable("pretrain", n)]
        else:
            recorded = PROJECTOR
        for k, values in enumerate(steps):
            for name in recorded:
                expected[f"train.{variant}.step{k + 1}.{name}"] = values[name]
    save_file(
        {k: v.contiguous() for k, v in expected.items()},
        out / "expected.safetensors",
        metadata={"format": "pt"},
    )
    save_file(
        {k: v.contiguous() for k, v in trained.items()},
        out / "trained_full_step3.safetensors",
        metadata={"format": "pt"},
    )
    mapping = [
        {
            "checkpoint_key": checkpoint_key(mem),
            "in_memory_key": mem,
            "llava_hf_hub_key": hub_key(checkpoint_key(mem)),
            "original_llava_next_key": original_key(checkpoint_key(mem)),
            "shape": shapes[mem],
        }
        for mem in mem_names
    ]
    (out / "key_mapping.json").write_text(json.dumps(mapping, indent=1))

    noise = reference_noise(model_dir, inputs, expected, trained)
    write_fixture_json(s, out, samples, n_targets, expected, train, noise)
    generate_goldens(out)
    return expected


GENERATE_NEW_TOKENS = 20


def generate_goldens(out):
    """HF `generate` on each sample's prompt (the tokens before its answer) and image, greedy,
    with and without the KV cache; written to generate.json. Reads only the folder (model/,
    inputs.safetensors, fixture.json), so it also runs on a committed fixture."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    fx = json.loads((out / "fixture.json").read_text())
    inputs = load_file(out / "inputs.safetensors")
    model = load_model(out / "model")
    model.eval()
    prompts = []
    for i, smp in enumerate(fx["batch"]["samples"]):
        n = smp["prompt_len"]
        ids = inputs["input_ids"][i : i + 1, :n]
        kw = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"][i : i + 1, : smp["num_patches_incl_base"]],
            image_sizes=inputs["image_sizes"][i : i + 1],
            max_new_tokens=GENERATE_NEW_TOKENS,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        got = {}
        with torch.no_grad():
            for cache in (True, False):
                seq = model.generate(**kw, use_cache=cache)
                got[cache] = seq[0, n:].tolist()
        prompts.append(
            {
                "sample": i,
                "prompt_len": n,
                "new_tokens_cached": got[True],
                "new_tokens_uncached": got[False],
            }
        )
    doc = {
        "what": "HF LlavaNextForConditionalGeneration.generate(input_ids=inputs.input_ids[i, "
        ":prompt_len], pixel_values=inputs.pixel_values[i, :num_patches], image_sizes, "
        f"max_new_tokens={GENERATE_NEW_TOKENS}, do_sample=False, eos_token_id={EOS}, "
        f"pad_token_id={PAD}), use_cache True and False; float32, eager attention, 1 thread. "
        "Tokens after the prompt (generation stops after eos).",
        "versions": versions(),
        "max_new_tokens": GENERATE_NEW_TOKENS,
        "eos_id": EOS,
        "prompts": prompts,
    }
    (out / "generate.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'generate.json'}")


def reference_noise(model_dir, inputs, expected, trained):
    """The reference's own float noise: SDPA vs eager, float64 vs float32 (not goldens)."""
    import torch

    valid = inputs["attention_mask"].bool()
    n = {}
    with torch.no_grad():
        sd = load_model(model_dir, attn="sdpa")
        r = sd(**model_inputs(inputs), labels=inputs["labels"])
        n["sdpa_vs_eager_logits_maxabs_valid"] = (
            (r.logits - expected["logits"])[valid].abs().max().item()
        )
        n["sdpa_vs_eager_loss_abs"] = (r.loss - expected["loss"]).abs().item()
        m64 = load_model(model_dir, torch.float64)
        r = m64(**model_inputs(inputs, torch.float64))
        loss64 = loss_fp(r.logits, inputs["labels"])
        n["fp64_vs_fp32_logits_maxabs_valid"] = (
            (r.logits - expected["logits"].double())[valid].abs().max().item()
        )
        n["fp64_vs_fp32_loss_abs"] = (loss64 - expected["loss"].double()).abs().item()
        n["fp64_loss"] = loss64.item()
        n["logits_absmax"] = expected["logits"][valid].abs().max().item()
        n["pil_vs_torchvision_pixel_values_maxabs"] = (
            (expected["preprocess.pixel_values_pil_backend"] - inputs["pixel_values"])
            .abs()
            .max()
            .item()
        )
    full64 = train_variant(model_dir, inputs, "full", torch.float64)
    pre64 = train_variant(model_dir, inputs, "pretrain", torch.float64)
    full32 = expected["train.full.losses"].tolist()
    pre32 = expected["train.pretrain.losses"].tolist()
    n["fp64_vs_fp32_train_full_losses_abs"] = [
        abs(float(a) - b) for a, b in zip(full64[0], full32)
    ]
    n["fp64_vs_fp32_train_pretrain_losses_abs"] = [
        abs(float(a) - b) for a, b in zip(pre64[0], pre32)
    ]
    gmax, grel = 0.0, 0.0
    tiny, zero = 0, 0
    for name, g64 in full64[2].items():
        key = f"grad.full.step1.{name}"
        if g64 is None or key not in expected:
            continue
        g32 = expected[key]
        d = (g64 - g32.double()).abs().max().item()
        gmax = max(gmax, d)
        absmax = g32.abs().max().item()
        if absmax > 0 and not (name.startswith("vision_tower") and name.endswith("k_proj.bias")):
            grel = max(grel, d / absmax)
        a = g32.abs()
        tiny += int(((a > 0) & (a < 1e-6)).sum())
        zero += int((a == 0).sum())
    n["fp64_vs_fp32_grad_full_step1_maxabs"] = gmax
    n["fp64_vs_fp32_grad_full_step1_max_rel_to_tensor_absmax_excl_zero_grad_tensors"] = grel
    w64, w32 = full64[3][-1], trained
    over, rest = {}, 0.0
    wmax = 0.0
    for name, v64 in w64.items():
        d = (v64 - w32[name].double()).abs().max().item()
        wmax = max(wmax, d)
        if d > 1e-5:
            g1 = expected.get(f"grad.full.step1.{name}")
            over[name] = {
                "w_step3_fp64_vs_fp32_maxabs": d,
                "grad1_absmax": g1.abs().max().item() if g1 is not None else 0.0,
                "grad1_fp64_vs_fp32_maxabs": (full64[2][name] - g1.double()).abs().max().item()
                if g1 is not None
                else 0.0,
            }
        else:
            rest = max(rest, d)
    pw = pre64[3][-1]
    pre32_w = {
        k[len("train.pretrain.step3.") :]: v
        for k, v in expected.items()
        if k.startswith("train.pretrain.step3.")
    }
    n["fp64_vs_fp32_weights_full_step3_maxabs"] = wmax
    n["fp64_vs_fp32_weights_pretrain_step3_maxabs"] = max(
        (pw[k] - v.double()).abs().max().item() for k, v in pre32_w.items()
    )
    n["full_step3_tensors_with_fp64_vs_fp32_weight_diff_gt_1e-5"] = over
    n["full_step3_weight_diff_maxabs_excluding_those"] = rest
    n["grad_full_step1_elements_0_lt_abs_lt_1e-6"] = tiny
    n["grad_full_step1_elements_exactly_zero"] = zero
    return n


SIZE_KEYS = [
    "tile",
    "patch",
    "vision_hidden",
    "vision_layers",
    "vision_heads",
    "vision_intermediate",
    "text_vocab",
    "text_hidden",
    "text_layers",
    "text_heads",
    "text_kv_heads",
]


def write_fixture_json(s, out, samples, n_targets, expected, train, noise):
    sizes = {k: s[k] for k in SIZE_KEYS}
    sizes["text_head_dim"] = s["text_hidden"] // s["text_heads"]
    sizes["text_intermediate"] = s["text_intermediate"]
    sizes["image_token_index"] = s["image_token_index"]
    sizes.update({"pad_id": PAD, "bos_id": BOS, "eos_id": EOS})
    sizes["image_grid_pinpoints_hw"] = s["image_grid_pinpoints_hw"]
    files = [
        "expected.safetensors",
        "inputs.safetensors",
        "key_mapping.json",
        "trained_full_step3.safetensors",
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "model/processor_config.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
    ] + [f"images/sample{i}.png" for i in range(len(samples))]
    fixture = {
        "name": s["name"],
        "generator": "scripts/make-parity-fixture.py",
        "seed": s["seed"],
        "versions": versions(),
        "sizes": sizes,
        "batch": {
            "batch_size": len(samples),
            "seq_len": int(expected["logits"].shape[1]),
            "n_loss_targets": n_targets,
            "samples": samples,
        },
        "loss": float(expected["loss"]),
        "train": {
            "optimizer": "torch.optim.AdamW",
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WD,
            "steps": STEPS,
            **train,
        },
        "reference_noise": noise,
        "notes": [
            "Made by scripts/make-parity-fixture.py; the layout and the meaning of every tensor "
            "are those of fixtures/tiny-llava-next-a (see its README)."
        ],
        "files": {
            f: {"bytes": (out / f).stat().st_size, "sha256": sha256(out / f)} for f in files
        },
    }
    (out / "fixture.json").write_text(json.dumps(fixture, indent=1))
    write_readme(s, out, fixture, expected)


def trim(smp):
    n = smp["unpad_removed_per_side"]
    return f"{smp['unpad_axis']}: -{n} each side" if n else "none"


def write_readme(s, out, fx, expected):
    sz, b, tr = fx["sizes"], fx["batch"], fx["train"]
    lines = [
        f"# {s['name']}: golden LLaVA-NeXT parity fixture (HF transformers reference)",
        "",
        "Made by `scripts/make-parity-fixture.py` (in the llava-next-rs repository). Layout, key "
        "names and the meaning of every tensor are those of `fixtures/tiny-llava-next-a/` (its "
        "README explains each file, the weight init, the unpad rule, the AdamW variants and the "
        "tolerances); only the sizes and numbers differ. CPU, float32, eager attention, one thread.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in fx["versions"].items()) + ".",
        "",
        "## Model",
        "",
        f"* Vision: CLIP ViT, tile {sz['tile']}, patch {sz['patch']} "
        f"({sz['tile'] // sz['patch']}x{sz['tile'] // sz['patch']} patches + CLS), hidden "
        f"{sz['vision_hidden']}, {sz['vision_layers']} layers, {sz['vision_heads']} heads, MLP "
        f"{sz['vision_intermediate']}, quick_gelu; vision_feature_layer -2, strategy 'default'.",
        f"* Projector: {sz['vision_hidden']} -> {sz['text_hidden']} -> {sz['text_hidden']}.",
        f"* LM: Llama, vocab {sz['text_vocab']}, hidden {sz['text_hidden']}, {sz['text_layers']} "
        f"layers, {sz['text_heads']} heads, {sz['text_kv_heads']} KV heads, head_dim "
        f"{sz['text_head_dim']}, MLP {sz['text_intermediate']}, RoPE theta 500000, untied lm_head.",
        f"* image_token_index {sz['image_token_index']}; pinpoints (H, W) "
        f"{sz['image_grid_pinpoints_hw']}. Seed {fx['seed']}: weights from torch.Generator(seed+1) "
        "in sorted in-memory key order, words from numpy RandomState(seed+2), images from "
        "RandomState(seed+3).",
        "",
        "## Batch",
        "",
        f"{b['batch_size']} samples, seq_len {b['seq_len']}, right padding, {b['n_loss_targets']} "
        "loss targets.",
        "",
        "| sample | image (H,W) | best res (H,W) | tiles (rows,cols) | patches incl. base | grid "
        "before unpad | unpad | grid after | image tokens | seq len |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, smp in enumerate(b["samples"]):
        lines.append(
            f"| {i} | {tuple(smp['image_hw'])} | {tuple(smp['best_resolution_hw'])} | "
            f"{tuple(smp['tiles_rows_cols'])} | {smp['num_patches_incl_base']} | "
            f"{tuple(smp['feature_grid_before_unpad_hw'])} | {trim(smp)} | "
            f"{tuple(smp['feature_grid_after_unpad_hw'])} | {smp['num_image_tokens']} = "
            f"{smp['base_tokens']} + {smp['grid_tokens_incl_newlines']} | {smp['seq_len']} |"
        )
    lines += [
        "",
        "## Training",
        "",
        f"torch.optim.AdamW(lr={tr['lr']}, betas={tuple(tr['betas'])}, eps={tr['eps']}, "
        f"weight_decay={tr['weight_decay']}), {tr['steps']} steps on the batch above.",
        "",
    ]
    for v in ["full", "pretrain", "projector_only"]:
        lines.append(
            f"* {v}: losses {tr[f'{v}_losses']}, after the updates {tr[f'{v}_loss_after']}."
        )
    lines += [
        f"* full: parameters without gradient: {tr['full_params_without_grad']}.",
        "",
        "## Tensors",
        "",
        "| file | name | shape | dtype |",
        "|---|---|---|---|",
    ]
    from safetensors import safe_open

    for f in ["inputs.safetensors", "expected.safetensors"]:
        with safe_open(out / f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                lines.append(f"| {f} | `{k}` | {tuple(sl.get_shape())} | {sl.get_dtype()} |")
    lines += [
        "",
        "## Reference noise",
        "",
        "```",
        json.dumps(fx["reference_noise"], indent=1),
        "```",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    for f, v in fx["files"].items():
        lines.append(f"| `{f}` | {v['bytes']} | `{v['sha256'][:16]}...` |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Comparison with an existing fixture (to check this script against tiny-llava-next-a)


def compare(out, ref):
    import torch
    from safetensors.torch import load_file

    ok = True
    print(f"\n## {out} vs {ref}\n")
    files = lambda d: {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}  # noqa
    for f in sorted(files(out) - files(ref)):
        print(f"only here: {f}")
        if f == "generate.json":
            continue  # added after tiny-llava-next-a was made
        ok = False
    for f in sorted(files(ref)):
        mine = out / f
        if not mine.exists():
            print(f"missing: {f}")
            ok = False
            continue
        same = sha256(mine) == sha256(ref / f)
        print(f"{'identical' if same else 'differs  '}  {f}")
    for f in [
        "inputs.safetensors",
        "expected.safetensors",
        "trained_full_step3.safetensors",
        "model/model.safetensors",
    ]:
        a, b = load_file(out / f), load_file(ref / f)
        if set(a) != set(b):
            print(f"{f}: keys differ: only here {sorted(set(a) - set(b))[:5]}, "
                  f"only there {sorted(set(b) - set(a))[:5]}")
            ok = False
        identical, worst, worst_rest = 0, (0.0, ""), (0.0, "")
        for k in sorted(set(a) & set(b)):
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
                print(f"{f}: {k}: {a[k].shape} {a[k].dtype} vs {b[k].shape} {b[k].dtype}")
                ok = False
                continue
            if torch.equal(a[k], b[k]):
                identical += 1
                continue
            d = (a[k].double() - b[k].double()).abs().max().item()
            worst = max(worst, (d, k))
            # CLIP k_proj.bias: zero gradient in exact arithmetic, AdamW amplifies its noise.
            if not (k.startswith(("vision_tower", "train.full.step")) and "k_proj.bias" in k):
                worst_rest = max(worst_rest, (d, k))
        print(
            f"{f}: {identical}/{len(b)} tensors bit-identical; worst max abs diff "
            f"{worst[0]:.3e} ({worst[1] or '-'}); without CLIP k_proj.bias {worst_rest[0]:.3e} "
            f"({worst_rest[1] or '-'})"
        )
    fa = json.loads((out / "fixture.json").read_text())
    fb = json.loads((ref / "fixture.json").read_text())
    for k in ["sizes", "batch", "loss", "train", "reference_noise"]:
        print(f"fixture.json {k}: {'same' if fa[k] == fb[k] else 'differs'}")
        if fa[k] != fb[k] and k in ("sizes", "batch"):
            ok = False
    for k in ["full", "pretrain", "projector_only"]:
        mine = fa["train"][f"{k}_losses"] + [fa["train"][f"{k}_loss_after"]]
        theirs = fb["train"][f"{k}_losses"] + [fb["train"][f"{k}_loss_after"]]
        d = max(abs(x - y) for x, y in zip(mine, theirs))
        print(f"losses {k}: {mine} vs {theirs}: max abs diff {d:.2e}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="b")
    ap.add_argument("--out", type=Path, help="output folder (created)")
    ap.add_argument(
        "--generate-only",
        type=Path,
        metavar="DIR",
        help="only (re)write DIR/generate.json from the fixture already in DIR",
    )
    ap.add_argument(
        "--images-from",
        type=Path,
        help="take images/sample{i}.png from this folder instead of drawing them "
        "(variant a defaults to fixtures/tiny-llava-next-a/images)",
    )
    ap.add_argument("--seed", type=int, help="override the variant's seed")
    ap.add_argument(
        "--check-against", type=Path, help="compare the result with this fixture folder"
    )
    args = ap.parse_args()
    if args.generate_only is not None:
        generate_goldens(args.generate_only)
        return
    if args.out is None:
        ap.error("--out is required (or --generate-only DIR)")
    s = copy.deepcopy(VARIANTS[args.variant])
    if args.seed is not None:
        s["seed"] = args.seed
    images_from = args.images_from
    if images_from is None and s["images_from"] is not None:
        images_from = REPO / s["images_from"]
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} exists and is not empty")
    build(s, args.out, images_from)
    print(f"wrote {args.out}")
    if args.check_against is not None and not compare(args.out, args.check_against):
        sys.exit(1)


if __name__ == "__main__":
    main()
