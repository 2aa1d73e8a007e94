"""Shared helpers of the FP8 tests (test_fp8, test_check, test_fp8_front_ends, test_fp8_kernels):
whether this torch runs FP8 on the CPU, the tiny plain and outlier-stress checkpoints, a runner
factory that runs fp8 on the CPU through the engine, and running a script in Triton's CPU
interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpuengine.errors import DeviceError
from gpuengine.models import fp8
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.pooling import PoolingRule
from gpuengine.runner import DTYPES, Runner
from gpuengine.synthetic import write_fair_esm_checkpoint


def _cpu_fp8() -> bool:
    """This torch runs row-wise scaled e4m3 GEMMs on the CPU (torch 2.13 does)."""
    try:
        fp8._gemm_out_dtype(torch.device("cpu"))
    except DeviceError:
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(not _cpu_fp8(), reason="this torch has no CPU _scaled_mm")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random ESM-2 checkpoints (2 layers, d 64): plain and outlier-stress."""
    root = tmp_path_factory.mktemp("fp8")
    return {kind: write_fair_esm_checkpoint(root / f"esm2_t2_{kind}.pt", 2, 64, 4, seed=3,
                                            stress=kind == "stress")
            for kind in ("plain", "stress")}


def cpu_fp8_factory(path):
    """A runner factory for the engine that runs fp8 on the CPU (its eager reference path)."""
    cfg, state, _ = read_fair_esm_checkpoint(path)

    def make(device, precision, outputs):
        return Runner(build_esm2(cfg, state, DTYPES[precision]), device, precision, outputs,
                      PoolingRule(1, 1), fp8_on_cpu=True)
    return make


def fp8_daemon(tmp_path, checkpoint, threshold: float):
    """A daemon watching ``tmp_path/w`` (prepared, not started) over a real store, whose runs
    are the real engine with the CPU's FP8 path and a fidelity guard at ``threshold``."""
    from gpuengine.config import EmbedConfig
    from gpuengine.daemon import Daemon, ServeConfig
    from gpuengine.engine import run_embed

    factory = cpu_fp8_factory(checkpoint)

    def run(config, progress, stop, replicas=None, **options):
        return run_embed(config, progress, stop, runner_factory=factory, replicas=replicas,
                         **options)

    embed = EmbedConfig(inputs=(tmp_path / "w" / "inbox",), model=str(checkpoint),
                        out=tmp_path / "store.lmdb", devices="cpu", precision="fp8",
                        max_tokens=512, fp8_min_cosine=threshold)
    daemon = Daemon(ServeConfig(watch=tmp_path / "w", embed=embed, retry_delay=0), run=run,
                    notify=lambda message: None)
    daemon.prepare()
    return daemon


def run_interpreted(script: str) -> None:
    """Run ``script`` in a child Python with Triton's interpreter; it must print ``ok`` last."""
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton.jit decorates a kernel
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def cli_result(args: list[str]) -> tuple[int, str, str]:
    """``gpuengine ARGS`` in process (cli_runs.cli: a traceback fails the test): exit code,
    stdout, stderr."""
    from cli_runs import cli

    result = cli(*args)
    return result.exit_code, result.stdout, result.stderr
