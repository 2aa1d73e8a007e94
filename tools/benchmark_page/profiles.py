"""The page's summaries of torch.profiler kernel tables, by kernel family."""

from __future__ import annotations

import re
from pathlib import Path

from benchmark_page.cells import table


FAMILIES = [
    ("GEMMs (cuBLAS nvjet, fused bias or residual): QKV/out projection and FFN", r"^nvjet"),
    ("fused rotary + QKV split (Triton, `…add_cat_mul_neg_split_unbind…`)", r"fused__to_copy_add_cat_mul_neg_split"),
    ("RoPE in place on the QKV projection (gpuengine Triton `_rope_qk_inplace`)", r"^_rope_qk_inplace"),
    ("FlashAttention varlen forward", r"flash_fwd"),
    ("FlexAttention (document mask + ALiBi, compiled)", r"flex_attention"),
    ("`v.contiguous()` copy out of the fused QKV output (Triton, `fused_clone_unbind_view`)", r"fused_clone_unbind_view"),
    ("GELU / GLU gate (gpuengine Triton `_gelu`)", r"^_gelu$"),
    ("GELU (inductor Triton)", r"fused_gelu"),
    ("LayerNorm, residual + LayerNorm (gpuengine Triton `_layer_norm`)", r"^_layer_norm$"),
    ("LayerNorms (inductor Triton, one fused with the residual add)", r"layer_norm"),
    ("residual add (Triton)", r"fused_add_\d"),
]


def profile_summary(path: Path) -> str:
    """Kernel rows (Self CPU 0, Self CUDA > 0) of a torch.profiler table, grouped into families."""
    total = None
    kernels = []
    for line in path.read_text().splitlines():
        m = re.match(r"Self CUDA time total:\s*([\d.]+)(ms|s)\b", line)
        if m:
            total = float(m.group(1)) * (1000 if m.group(2) == "s" else 1)
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) == 11 and cols[2] == "0.000us" and cols[6].endswith("ms"):
            kernels.append((cols[0], float(cols[6][:-2]), float(cols[7].rstrip("%")), int(cols[10])))
    rows, used = [], set()
    for label, pat in FAMILIES:
        hit = [kn for kn in kernels if re.search(pat, kn[0]) and kn[0] not in used]
        if not hit:
            continue
        used.update(kn[0] for kn in hit)
        rows.append([label, len(hit), f"{sum(kn[1] for kn in hit):.1f}", f"**{sum(kn[2] for kn in hit):.1f} %**",
                     sum(kn[3] for kn in hit)])
    rest = [kn for kn in kernels if kn[0] not in used]
    for kn in rest:
        rows.append([f"`{kn[0]}`", 1, f"{kn[1]:.1f}", f"{kn[2]:.1f} %", kn[3]])
    listed = sum(kn[1] for kn in kernels)
    rows.append(["all kernels listed", len(kernels), f"{listed:.1f}",
                 f"{100 * listed / total:.1f} %" if total else "—", sum(kn[3] for kn in kernels)])
    return (table(["kernel family", "kernels", "GPU ms", "share of GPU time", "launches"], rows)
            + f"\n\nSelf CUDA time total: {total} ms (`{path.name}`).")
