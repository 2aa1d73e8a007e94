"""Device description and budget explanation (no GPU needed: the numbers are given)."""

from __future__ import annotations

from gpuengine.budget import DEFAULT_GPU_MAX_TOKENS, activation_bytes_per_token
from gpuengine.devices import GPU_MARGIN_BYTES, DeviceInfo, budget_explanation


def test_budget_explanation_names_memory_margin_and_cap(tiny_pt):
    big = DeviceInfo("cuda:0", "H200", 140 << 30, 130 << 30, "nvml", "GPU-x")
    small = DeviceInfo("cuda:1", "small", 8 << 30, 3 << 30, "torch")
    out = budget_explanation(str(tiny_pt), "fp16", [big, small])
    per_token = activation_bytes_per_token(64, 2, 1)
    assert out["cuda:0"]["tokens"] == DEFAULT_GPU_MAX_TOKENS
    assert "capped" in out["cuda:0"]["why"] and "nvml" in out["cuda:0"]["why"]
    assert out["cuda:1"]["tokens"] == min(DEFAULT_GPU_MAX_TOKENS,
                                          ((3 << 30) - GPU_MARGIN_BYTES) // per_token)
    assert "torch" in out["cuda:1"]["why"] and "margin" in out["cuda:1"]["why"]
