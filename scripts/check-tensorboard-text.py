#!/usr/bin/env python3
"""Reads a run's TensorBoard folder with the real `tensorboard` package (not installed by
scripts/setup.sh: `python -m venv /tmp/tb && /tmp/tb/bin/pip install tensorboard`) and prints
what its text plugin shows: the `eval_prompts` answers of `llava-trainer run --tensorboard DIR`.

    /tmp/tb/bin/python scripts/check-tensorboard-text.py out/runs/x/tb
"""
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util

acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.TENSORS: 0})
acc.Reload()
tags = acc.Tags()
print("text tags:", tags["tensors"], "scalar tags:", tags["scalars"])
for tag in tags["tensors"]:
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text", tag
    for ev in acc.Tensors(tag):
        arr = tensor_util.make_ndarray(ev.tensor_proto)
        text_plugin.text_array_to_html(arr, enable_markdown=True)  # what the Text tab renders
        print(f"{tag} step {ev.step}: {arr.item().decode()!r}")
m = pem.EventMultiplexer({"run": sys.argv[1]})
m.Reload()
found = m.PluginRunToTagToContent("text")
assert found.get("run"), "the text plugin sees no tags"
print("text plugin:", sorted(found["run"]))
