"""How often FlexAttention compiles (models/flex.py): once for batches of every row bucket when
compiled with dynamic shapes (the default), once per bucket when static. Counted on the CPU
with dynamo's counters and the ``aot_eager`` backend (inductor's CPU code for dynamic flex
does not build here; the GPU runs inductor, whose graphs dynamo's count is the count of)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpuengine.models.attention import PackedLayout
from gpuengine.models.dnabert_s import AlibiPaddedAttention, FlexAlibiAttention
from gpuengine.models.flex import FLEX_BLOCK, flex_available, flex_bucket

pytestmark = [pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention"),
              pytest.mark.filterwarnings("ignore")]

BATCHES = ([30, 20], [100, 50, 20], [200, 300], [7, 500, 220, 9])
"""Packed rows 50, 170, 500, 736: buckets 64, 256, 512, 1024 (four)."""


def layout_of(lengths):
    lengths = torch.tensor(lengths)
    return PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=True)


def graphs_for(attention) -> tuple[int, list[torch.Tensor]]:
    """Compilations (dynamo's unique graphs) for :data:`BATCHES`, and the outputs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for lengths in BATCHES:
        q, k, v = (torch.randn(sum(lengths), 2, 16, generator=gen) for _ in range(3))
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            outputs.append((attention(q, k, v, layout_of(lengths)), q, k, v, lengths))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs, outputs


def test_the_batches_meet_several_buckets():
    assert len({flex_bucket(sum(lengths)) for lengths in BATCHES}) == 4


def test_dynamic_flex_compiles_once_for_every_bucket_and_stays_exact():
    attention = FlexAlibiAttention(compiled=True, backend="aot_eager")
    assert attention.dynamic  # the default
    graphs, outputs = graphs_for(attention)
    assert graphs == 1
    for out, q, k, v, lengths in outputs:  # the same numbers as the exact padded ALiBi path
        exact = AlibiPaddedAttention()(q, k, v, layout_of(lengths))
        assert (out - exact).abs().max().item() <= 1e-5


def test_static_flex_compiles_once_per_bucket():
    graphs, _ = graphs_for(FlexAlibiAttention(compiled=True, dynamic=False, backend="aot_eager"))
    assert graphs == 4


def test_dynamic_rows_are_at_least_two_blocks():
    """A row count of one block would be a dimension of size 1 (one block), which dynamo
    specialises: it would compile a second time."""
    dynamic = FlexAlibiAttention(compiled=True, backend="aot_eager")
    static = FlexAlibiAttention(compiled=True, dynamic=False, backend="aot_eager")
    assert dynamic.padded_rows(1) == dynamic.padded_rows(2 * FLEX_BLOCK) == 2 * FLEX_BLOCK
    assert static.padded_rows(1) == FLEX_BLOCK
    assert all(dynamic.padded_rows(t) == flex_bucket(t) for t in (129, 1000, 65536))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dynamic", [True, False])
def test_gpu_inductor_flex_compiles_as_counted_and_matches_padded(dynamic):
    """On the GPU, inductor's kernel (``IS_DIVISIBLE`` told, not proved, when dynamic): one
    compilation for four buckets (static: four), fp16 results as close to the exact fp32
    padded path as the static kernel's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    attention = FlexAlibiAttention(compiled=True, dynamic=dynamic)
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 1.0
    for lengths in BATCHES:
        layout = PackedLayout.build(torch.tensor(lengths, device="cuda"), sum(lengths),
                                    max(lengths), padded=True)
        q, k, v = (torch.randn(sum(lengths), 12, 64, generator=gen, device="cuda")
                   for _ in range(3))
        with torch.inference_mode():
            out = attention(q.half(), k.half(), v.half(), layout).float()
            exact = AlibiPaddedAttention()(q, k, v, layout)
        worst = min(worst, torch.nn.functional.cosine_similarity(out, exact, dim=-1).min().item())
    assert counters["stats"]["unique_graphs"] == (1 if dynamic else len(BATCHES))
    torch._dynamo.reset()
    assert worst >= 0.9999, worst
