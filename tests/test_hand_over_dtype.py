"""Vectors handed over in the store's dtype: a run into a float16 table has its runners cast the
pooled vectors on the device (``Runner.hand_over_dtype``), where the store writer cast them
with numpy before. The stored bits must not change (test_engine's float16 run compares the
store with the fp32 store cast by numpy); these check the pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuengine.engine import hand_over_in_store_dtype
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.packing import WorkItem
from gpuengine.pooling import PoolingRule
from gpuengine.runner import Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec
from gpuengine.tokenization import EsmTokenizer

from conftest import random_proteins


def _hard_float32_values() -> np.ndarray:
    """float16's awkward cases as float32: ties between two halves (even and odd), the
    subnormal range and its underflow, the largest half and past it, signed zeros, infinities,
    plus random values of every magnitude."""
    halves = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].astype(np.float32)
    up = np.nextafter(halves, np.float32(np.inf))
    ties = (halves[:-1].astype(np.float64) + halves[1:].astype(np.float64)) / 2
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 6, 200_000))
    special = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 6e-8]
    return np.concatenate([halves, up, ties, rand, special]).astype(np.float32)


def _numpy_half(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # past 65504: inf, as the writer's cast gave
        return values.astype(np.float16)


def test_torch_casts_float32_to_float16_as_numpy_does_bit_for_bit():
    values = _hard_float32_values()
    ours = torch.from_numpy(values).to(torch.float16).numpy()
    np.testing.assert_array_equal(ours.view(np.uint16), _numpy_half(values).view(np.uint16))


@pytest.mark.gpu
def test_cuda_casts_float32_to_float16_as_numpy_does_bit_for_bit():
    values = _hard_float32_values()
    ours = torch.from_numpy(values).cuda().to(torch.float16).cpu().numpy()
    np.testing.assert_array_equal(ours.view(np.uint16), _numpy_half(values).view(np.uint16))


def _spec(store_dtype: str) -> TableSpec:
    return TableSpec("default", ModelIdentity("esm", "m", "0" * 64, 1, 8, 1, 32),
                     (OutputSpec(1, "mean"),), store_dtype, 8, None)


def test_a_run_sets_the_hand_over_dtype_from_its_table():
    class Simulated:  # a test's device without the attribute: left alone
        pass

    runner = Runner.__new__(Runner)
    hand_over_in_store_dtype(runner, _spec("float16"))
    assert runner.hand_over_dtype == "float16"
    hand_over_in_store_dtype(runner, _spec("float32"))
    assert runner.hand_over_dtype is None
    runner.hand_over_dtype = "float16"  # a pooled replica's last run: the guard resets it
    hand_over_in_store_dtype(runner, None)
    assert runner.hand_over_dtype is None
    simulated = Simulated()
    hand_over_in_store_dtype(simulated, _spec("float16"))
    assert not hasattr(simulated, "hand_over_dtype")


@pytest.mark.parametrize("pool", ["mean", "per-token"])
def test_a_runner_hands_over_the_fp32_vectors_rounded_to_float16(tiny_pt, pool):
    cfg, state, _ = read_fair_esm_checkpoint(tiny_pt)
    runner = Runner(build_esm2(cfg, state, torch.float32), torch.device("cpu"), "fp32",
                    [OutputSpec(2, pool)], PoolingRule(1, 1))
    tok = EsmTokenizer()
    items = [WorkItem(sequence_digest(s), tok.encode(s), len(s))
             for s in random_proteins([3, 50, 1, 11], seed=8)]
    fp32 = runner.embed(items)
    runner.hand_over_dtype = "float16"
    half = runner.embed(items)
    (a,), (b,) = fp32.vectors.values(), half.vectors.values()
    a = a if isinstance(a, np.ndarray) else np.concatenate(a)
    b = b if isinstance(b, np.ndarray) else np.concatenate(b)
    assert a.dtype == np.float32 and b.dtype == np.float16
    np.testing.assert_array_equal(b.view(np.uint16), a.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(half.finite, fp32.finite)
