"""Whether the package's Triton kernels (:mod:`.rotary_triton`, :mod:`.pointwise_triton`) can run."""

from __future__ import annotations

import torch


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
