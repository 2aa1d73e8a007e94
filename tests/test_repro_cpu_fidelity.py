"""tools/repro_cpu_fidelity.py's op check: the capturing layer functions give the eager
forward's exact result, and a kept op output that differs from its recomputation is named
with its rows (what the tool reports from a failing run)."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import torch

from gpuengine.models.attention import PackedLayout, PaddedAttention
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint

TOOL = Path(__file__).resolve().parents[1] / "tools" / "repro_cpu_fidelity.py"


def _tool():
    spec = importlib.util.spec_from_file_location("repro_cpu_fidelity", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_capture_is_the_eager_forward_and_the_recheck_names_a_wrong_op(tiny_pt):
    tool = _tool()
    cfg, state, _ = read_fair_esm_checkpoint(tiny_pt)
    model = build_esm2(cfg, state, torch.float32)
    lengths = torch.tensor([5, 42, 19, 122, 66])
    ids = torch.randint(4, 24, (int(lengths.sum()),), generator=torch.Generator().manual_seed(0))
    layout = PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=True)
    with torch.no_grad():
        plain = model(ids, layout, [1, 2], PaddedAttention())
    kept: list = []
    padded_call, restore = tool._install_capture(kept, tool._mxcsr_reader())
    try:
        with torch.no_grad():
            captured = model(ids, layout, [1, 2], PaddedAttention())
    finally:
        restore()
    assert torch.equal(captured[1], plain[1]) and torch.equal(captured[2], plain[2])
    assert [kind for kind, *_ in kept] == ["inputs", "attention", "ffn"] * 2
    out: dict = {}
    thread = threading.Thread(target=lambda: out.__setitem__("ok", tool._recheck(kept, padded_call)))
    thread.start()
    thread.join()
    assert all("exact" in line and "rows" not in line for line in out["ok"]), out["ok"]
    kept[0][3]["h"][130:140] += 1e-5  # the first layer's LN1 output wrong in rows 130-139
    kept[5][3]["f1"][7] *= 1.001  # the second layer's fc1 output wrong in row 7
    lines = tool._recheck(kept, padded_call)
    assert lines[0].startswith("0 inputs[") and "LN1 rows 130..139 (10)" in lines[0], lines
    assert "fc1 rows 7..7 (1)" in lines[5] and "out_proj exact" in lines[5], lines
    assert "rows" not in lines[2] + lines[3], lines
    # the originals are back: a forward after restore() keeps nothing
    with torch.no_grad():
        model(ids, layout, [1], PaddedAttention())
    assert len(kept) == 6
