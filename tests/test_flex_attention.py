"""FlexAttention on packed rows without a bias (models/flex.py), used by ESM-2 for batches of
short sequences: the same numbers as the exact padded attention, run uncompiled on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpuengine.models.attention import PackedLayout, PaddedAttention
from gpuengine.models.flex import FlexDocumentAttention, LengthSwitchedAttention, flex_available

pytestmark = [pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention"),
              pytest.mark.filterwarnings("ignore")]


def layout_of(lengths, padded=True):
    lengths = torch.tensor(lengths)
    return PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=padded)


@pytest.mark.parametrize("block", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_flex_document_attention_equals_padded_attention(block):
    lengths = [3, 130, 1, 257, 40, 129, 64]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    layout = layout_of(lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = FlexDocumentAttention(compiled=False, block=block)(q, k, v, layout)
    exact = PaddedAttention()(q * 16 ** -0.5, k, v, layout)  # the padded path takes a scaled q
    assert flex.shape == exact.shape
    assert (flex - exact).abs().max().item() <= 1e-5


def test_length_switch_binds_flex_for_short_batches_only():
    class Long:
        prescale_q = needs_padding = False

        def __call__(self, q, k, v, layout):
            return q

    long = Long()
    switched = LengthSwitchedAttention(long, FlexDocumentAttention(compiled=False), flex_max_len=100)
    short = switched.bind(layout_of([5, 100, 7], padded=False), 4, torch.float32)
    assert short is not long and short.rows % 64 == 0 and short.total == 112
    assert switched.bind(layout_of([5, 101], padded=False), 4, torch.float32) is long
    with pytest.raises(ValueError, match="unscaled q"):
        LengthSwitchedAttention(PaddedAttention(), FlexDocumentAttention(compiled=False), 100)


def test_esm2_with_flex_attention_equals_the_padded_model(tmp_path):
    """The whole ESM-2 forward (fp32, eager layers) with flex bound once per batch matches the
    exact padded attention (≤ 1e-5)."""
    from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
    from gpuengine.synthetic import write_fair_esm_checkpoint

    cfg, state, _ = read_fair_esm_checkpoint(write_fair_esm_checkpoint(tmp_path / "esm2_t2.pt", 2, 64, 4))
    model = build_esm2(cfg, state, torch.float32)
    model.share_rope_tables_if_equal()
    lengths = [3, 70, 1, 17, 66]
    ids = torch.randint(4, 24, (sum(lengths),), generator=torch.Generator().manual_seed(1))

    class UnscaledPadded(PaddedAttention):  # flex scales q itself
        prescale_q = False

        def __call__(self, q, k, v, layout):
            return super().__call__(q * q.shape[-1] ** -0.5, k, v, layout)

    with torch.inference_mode():
        exact = model(ids, layout_of(lengths), [1, 2], UnscaledPadded())
        flex = model(ids, layout_of(lengths, padded=False), [1, 2], FlexDocumentAttention(compiled=False))
    for layer in (1, 2):
        assert (exact[layer] - flex[layer]).abs().max().item() <= 1e-5
