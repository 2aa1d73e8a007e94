"""Whether the package's Triton kernels (:mod:`.rotary_triton`, :mod:`.pointwise_triton`,
:mod:`.gemm_triton`) can run, and how their autotuned kernels are launched."""

from __future__ import annotations

import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch_autotuned(kernel, grid, *args, **kwargs) -> None:
    """Launch a ``triton.autotune``d kernel; Triton's CPU interpreter (tests) cannot time
    trials, so there the first configuration runs."""
    if _INTERPRET:
        kernel.fn[grid](*args, **kwargs, **kernel.configs[0].kwargs)
    else:
        kernel[grid](*args, **kwargs)


def triton_available(device: torch.device | str) -> bool:
    """True on a CUDA device where Triton is installed (CUDA builds of torch bring it)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import gpuengine.models.pointwise_triton  # noqa: F401
        import gpuengine.models.rotary_triton  # noqa: F401
    except ImportError:
        return False
    return True
