#!/usr/bin/env python3
"""Writes fixtures/chat-templates/golden.json: HF's rendering of chat templates for LLaVA
prompts, the golden of `trainer/src/generate/chat_template.rs`.

For each template and image count: `LlavaNextProcessor.apply_chat_template(messages,
add_generation_prompt=True)` (transformers' Jinja2 sandbox: trim_blocks, lstrip_blocks,
loopcontrols, raise_exception, the tokenizer's special tokens) with one user turn whose content
is the images then the text, as `llava-trainer generate` builds it.

    .venv/bin/python scripts/make-chat-template-golden.py   # transformers 4.57.6
"""
import json
import os
import pathlib
import sys

import transformers
from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures/chat-templates/golden.json"

# What our checkpoints carry (trainer/src/io/hf_tokenizer.rs LLAVA_LLAMA3_CHAT_TEMPLATE).
def llava_llama3():
    src = (ROOT / "trainer/src/io/hf_tokenizer.rs").read_text()
    start = src.index("pub const LLAVA_LLAMA3_CHAT_TEMPLATE: &str = concat!(")
    body = src[start:src.index(");", start)]
    parts = []
    for line in body.splitlines()[1:]:
        line = line.strip()
        if line.startswith('"'):
            parts.append(json.loads(line.rstrip(",")))
    return "".join(parts)

TEMPLATES = {
    "llava_llama_3": llava_llama3(),
    # Meta-Llama-3-8B-Instruct's tokenizer_config.json (bos_token in the text).
    "llama3_instruct": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # The llava-hf style: images then text per message, written over several lines (trim_blocks,
    # lstrip_blocks and loop controls matter).
    "multiline_llava_hf": """{% for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {# images first #}
    {% for content in message['content'] | selectattr('type', 'equalto', 'image') %}
        {{ '<image>\\n' }}
    {% endfor %}
    {% for content in message['content'] %}
        {% if content['type'] != 'text' %}{% continue %}{% endif %}
        {{ content['text'] }}
    {% endfor %}
    {{- '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
""",
}


def main():
    # Llama-3's tokenizer (LLAVA_TOKENIZER, scripts/setup.sh) with its special tokens.
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.environ.get("LLAVA_TOKENIZER", ROOT / ".cache/tokenizer/tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessor(), tokenizer=tok)
    question = "  What is shown here?\n"
    cases = []
    for name, template in TEMPLATES.items():
        for n_images in (0, 1, 2):
            content = [{"type": "image"}] * n_images
            if name == "llama3_instruct":
                # A string-content template: `<image>\n` lines then the text, one string.
                messages = [{"role": "user", "content": "<image>\n" * n_images + question}]
            else:
                messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
            text = proc.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
            cases.append({"template": name, "n_images": n_images, "question": question,
                          "string_content": name == "llama3_instruct", "text": text})
    out = {
        "transformers": transformers.__version__,
        "special_tokens": tok.special_tokens_map,
        "templates": TEMPLATES,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
