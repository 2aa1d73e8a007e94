"""Pooling of packed hidden states: the mean against a plain per-sequence reference, across
padded blocks, and isolation of a non-finite row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuengine import pooling
from gpuengine.pooling import PoolingIndex, PoolingRule, pool


def packed(lengths, width=24, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    hidden = torch.randn(int(lens.sum()), width, generator=gen).to(dtype)
    return hidden, lens, starts


def reference(hidden, lengths, rule, mode):
    out, start = [], 0
    for n in lengths:
        rows = hidden[start:start + n].double()
        body = rows[rule.lead:n - rule.trail]
        out.append({"mean": body.mean(0), "bos": rows[0]}[mode] if mode != "per-token" else body)
        start += n
    return torch.cat(out) if mode == "per-token" else torch.stack(out)


@pytest.mark.parametrize("rule", [PoolingRule(1, 1), PoolingRule(0, 0)])
@pytest.mark.parametrize("block_elements", [1 << 25, 24 * 40])  # one block; many small blocks
@pytest.mark.parametrize("mode", ["mean", "bos", "per-token"])
def test_pool_matches_a_per_sequence_reference(rule, block_elements, mode, monkeypatch):
    monkeypatch.setattr(pooling, "MEAN_BLOCK_ELEMENTS", block_elements)
    lengths = [3, 40, 2 + rule.lead + rule.trail, 17, 1 + rule.lead + rule.trail, 9, 33]
    hidden, lens, starts = packed(lengths)
    index = PoolingIndex.build(lens, starts, int(lens.sum()), rule, max(lengths))
    got = pool(hidden, index, mode)
    assert got.dtype == torch.float32
    want = reference(hidden, lengths, rule, mode)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= 1e-6


def test_mean_accumulates_half_precision_in_fp32():
    lengths = [500, 7]
    hidden, lens, starts = packed(lengths, dtype=torch.float16, seed=2)
    hidden[:500] += 100  # a large common offset: fp16 accumulation would lose the small parts
    index = PoolingIndex.build(lens, starts, int(lens.sum()), PoolingRule(0, 0), 500)
    got = pool(hidden, index, "mean")
    want = reference(hidden, lengths, PoolingRule(0, 0), "mean")
    assert (got.double() - want).abs().max().item() <= 1e-4


def test_a_non_finite_row_stays_in_its_own_sequence(monkeypatch):
    monkeypatch.setattr(pooling, "MEAN_BLOCK_ELEMENTS", 24 * 10)
    lengths = [5, 12, 4]
    hidden, lens, starts = packed(lengths)
    hidden[0, 3] = float("nan")  # row 0: padding positions of the other sequences point here
    index = PoolingIndex.build(lens, starts, int(lens.sum()), PoolingRule(0, 0), 12)
    got = pool(hidden, index, "mean")
    assert torch.isnan(got[0]).any()
    assert torch.isfinite(got[1:]).all()
    np.testing.assert_allclose(got[1:].numpy(), reference(hidden, lengths, PoolingRule(0, 0),
                                                          "mean")[1:].numpy(), atol=1e-6)
