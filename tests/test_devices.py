"""Device description and budget explanation (no GPU needed: the numbers are given), and
``devices --model NAME`` for published names without their weights."""

from __future__ import annotations

import json

import pytest

from gpuengine.budget import (DEFAULT_CPU_MAX_TOKENS, DEFAULT_GPU_MAX_TOKENS,
                              activation_bytes_per_token)
from gpuengine.devices import GPU_MARGIN_BYTES, DeviceInfo, budget_explanation
from gpuengine.synthetic import ESM2_SHAPES


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


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty torch-hub and Hugging Face caches, downloads off: no published weights anywhere."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("GPUENGINE_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name, dim", [*((n, shape[1]) for n, shape in ESM2_SHAPES.items()),
                                       ("zhihan1996/DNABERT-S", 768)])
def test_budget_of_a_published_name_needs_no_weights(no_weights, name, dim):
    gpu = DeviceInfo("cuda:0", "H200", 140 << 30, 20 << 30, "nvml", "GPU-x")
    cpu = DeviceInfo("cpu", "CPU", 64 << 30, None, "host")
    out = budget_explanation(name, "bf16", [cpu, gpu])
    per_token = activation_bytes_per_token(dim, 2, 1)
    assert out["cuda:0"]["tokens"] == min(DEFAULT_GPU_MAX_TOKENS,
                                          ((20 << 30) - GPU_MARGIN_BYTES) // per_token)
    assert f"d={dim}," in out["cuda:0"]["why"]
    assert out["cpu"] == {"tokens": DEFAULT_CPU_MAX_TOKENS,
                          "why": f"fixed on the CPU (--max-tokens sets it); d={dim}"}


def test_devices_model_published_name_offline(no_weights):
    from cli_runs import cli

    result = cli("devices", "--model", "esm2_t48_15B_UR50D", "--json")
    assert result.exit_code == 0, result.stderr
    cpu = next(d for d in json.loads(result.stdout) if d["device"] == "cpu")
    assert cpu["budget"]["tokens"] == DEFAULT_CPU_MAX_TOKENS and "d=5120" in cpu["budget"]["why"]
    result = cli("devices", "--model", "esm2_t6_8M_UR50D")
    assert result.exit_code == 0, result.stderr
    assert "budget 4,096 tokens" in result.stdout and "d=320" in result.stdout


def test_devices_model_unknown_name_still_refused(no_weights):
    from cli_runs import cli

    result = cli("devices", "--model", "esm2_t99_1T_UR50D")
    assert result.exit_code == 1 and "known names" in result.stderr
