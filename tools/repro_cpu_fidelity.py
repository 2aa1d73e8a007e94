#!/usr/bin/env python3
"""Reproducer for the intermittent CPU fidelity defect of ``tests/test_api.py``'s ``cli_store``.

Once in a few CI runs the first, in-process ``gpuengine embed --gpus cpu`` of a pytest process
stored vectors 2-8e-5 from fair-esm (tolerance 1e-5; 6.2346458e-05 recurred bit for bit). The
failures seen so far are two exact alternatives split at row 127 of the 254-row batch (the
2-thread OpenMP split of a row-parallel op): rows 0-126 wrong, or rows >= 127 wrong. Each run
here is one fresh child process that does what CI does, optionally after the full pytest
collection (``--collect``, what CI's process has done before the fixture), and reports:

* ``diff``: the stored layer-1 bos vectors against fair-esm (``bad`` when > 1e-5);
* ``ops``: which op of the forward went wrong. The eager layer functions are replaced by
  copies that run the same ATen ops and keep their inputs and outputs (no hooks, no clones:
  the previous hunt saw module hooks make failures vanish); after the run every op is run
  again from its kept inputs in a fresh thread and compared bit for bit (``exact``, or the
  rows that differ). The op whose recomputation differs is the faulty one.
* ``mxcsr``: the device thread's MXCSR at the start of each layer (0x1fa0 is the default
  0x1f80 with the sticky precision flag).

    python3 tools/repro_cpu_fidelity.py --runs 40 --collect --load --out r.jsonl   # VM: ~10 min
    python3 tools/repro_cpu_fidelity.py --runs 100 --threads 2 --out $OUT/results.jsonl

``--load`` starts, for the whole loop, what made it show on the 2-core VM: a disk writer
(256 MiB of random bytes, fsync, delete, again) and a process of torch CPU matmuls; both are
ended and waited for before the tool exits. ``--env KEY=VALUE`` (repeatable) sets a variable
in each run's environment, e.g. ``--env OMP_NUM_THREADS=1`` or ``--env MKL_CBWR=COMPATIBLE``:
a candidate counts only if it stops failures at a rate that otherwise shows them.
Rows of ``--out``: one per run (``system`` = ``repro-cpu-fidelity``), then a summary row.

Measured on the 2-core VM: 3 bad in 40 engine runs after the collection with a dd+sync
loop and a torch process as load (previous session); 0 in 50 with ``--collect --load``,
0 in 55 of the real pytest test and 0 in 67 engine runs (this session, other helpers' test
loops keeping the load average at 5-10), 0 in ~3,000 first-of-a-shape forwards in fresh
threads without the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# --- one run (child process) -------------------------------------------------------------

def _mxcsr_reader():
    """A function returning the calling thread's MXCSR (x86-64 only; None elsewhere or where
    executable anonymous pages are refused)."""
    import ctypes
    import mmap
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:  # a system that refuses executable anonymous pages
        return None
    page.write(b"\x0f\xae\x1f\xc3")  # stmxcsr [rdi]; ret
    store = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(page)))

    def read() -> int:
        value = ctypes.c_uint32(0)
        store(ctypes.addressof(value))
        return value.value
    read.page = page  # keep the code page alive
    return read


def _install_capture(kept: list, mxcsr):
    """Swap the eager layer functions and the padded attention for copies that keep every op's
    inputs and outputs in ``kept`` (same ops, same order as gpuengine.models.esm2); returns
    the original attention call and a function that puts the originals back."""
    import threading

    import torch.nn.functional as F

    import gpuengine.models.attention as attention
    import gpuengine.models.esm2 as esm2

    rotate = esm2.apply_rotary

    def attention_inputs(x, norm_w, norm_b, qkv_w, qkv_b, cos, sin, heads, q_scale, eps, rows=None):
        mx = mxcsr() if mxcsr else None
        total = x.shape[0]
        h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
        qkv = F.linear(h, qkv_w, qkv_b)
        q, k, v = qkv.view(total, 3, heads, -1).unbind(1)
        if q_scale != 1.0:
            q = q * q_scale
        out = rotate(q, cos, sin), rotate(k, cos, sin), v.contiguous()
        kept.append(("inputs", threading.current_thread().name, mx, dict(
            x=x, norm_w=norm_w, norm_b=norm_b, qkv_w=qkv_w, qkv_b=qkv_b, eps=eps, h=h, qkv=qkv)))
        return out

    def attention_output_and_ffn(x, attn, out_w, out_b, norm_w, norm_b, fc1_w, fc1_b, fc2_w,
                                 fc2_b, eps):
        mx = mxcsr() if mxcsr else None
        o = F.linear(attn.reshape(x.shape[0], -1), out_w, out_b)
        x1 = x + o
        h = F.layer_norm(x1, (x1.shape[-1],), norm_w, norm_b, eps)
        f1 = F.linear(h, fc1_w, fc1_b)
        g = F.gelu(f1)
        f2 = F.linear(g, fc2_w, fc2_b)
        y = x1 + f2
        kept.append(("ffn", threading.current_thread().name, mx, dict(
            x=x, attn=attn, out_w=out_w, out_b=out_b, norm_w=norm_w, norm_b=norm_b, fc1_w=fc1_w,
            fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b, eps=eps, o=o, x1=x1, h=h, f1=f1, g=g, f2=f2, y=y)))
        return y

    padded_call = attention.PaddedAttention.__call__

    def padded(self, q, k, v, layout):
        out = padded_call(self, q, k, v, layout)
        kept.append(("attention", threading.current_thread().name, None,
                     dict(q=q, k=k, v=v, layout=layout, out=out)))
        return out

    saved = (esm2.LayerKernels.__dict__["attention_inputs"],
             esm2.LayerKernels.__dict__["attention_output_and_ffn"])

    def restore() -> None:
        esm2.LayerKernels.attention_inputs, esm2.LayerKernels.attention_output_and_ffn = saved
        attention.PaddedAttention.__call__ = padded_call

    esm2.LayerKernels.attention_inputs = staticmethod(attention_inputs)
    esm2.LayerKernels.attention_output_and_ffn = staticmethod(attention_output_and_ffn)
    attention.PaddedAttention.__call__ = padded
    return padded_call, restore


def _rows(kept, again) -> str:
    diff = (kept - again).reshape(kept.shape[0], -1).abs().amax(1)
    rows = diff.nonzero().flatten().tolist()
    return f"rows {rows[0]}..{rows[-1]} ({len(rows)}) max {float(diff.max()):.3e}" if rows else "exact"


def _recheck(kept: list, padded_call) -> list[str]:
    """Every kept op run again from its kept inputs, compared with what the run produced."""
    import torch.nn.functional as F

    from gpuengine.models.attention import PaddedAttention

    lines = []
    for layer_op, (kind, thread, mx, c) in enumerate(kept):
        if kind == "inputs":
            d = c["x"].shape[-1]
            ln = F.layer_norm(c["x"], (d,), c["norm_w"], c["norm_b"], c["eps"])
            qkv = F.linear(c["h"], c["qkv_w"], c["qkv_b"])
            lines.append(f"{layer_op} inputs[{thread}]: LN1 {_rows(c['h'], ln)}; qkv {_rows(c['qkv'], qkv)}")
        elif kind == "attention":
            out = padded_call(PaddedAttention(), c["q"], c["k"], c["v"], c["layout"])
            lines.append(f"{layer_op} attention[{thread}]: {_rows(c['out'], out)}")
        else:
            d = c["x"].shape[-1]
            o = F.linear(c["attn"].reshape(c["x"].shape[0], -1), c["out_w"], c["out_b"])
            steps = [("out_proj", c["o"], o), ("residual", c["x1"], c["x"] + c["o"]),
                     ("LN2", c["h"], F.layer_norm(c["x1"], (d,), c["norm_w"], c["norm_b"], c["eps"])),
                     ("fc1", c["f1"], F.linear(c["h"], c["fc1_w"], c["fc1_b"])),
                     ("gelu", c["g"], F.gelu(c["f1"])),
                     ("fc2", c["f2"], F.linear(c["g"], c["fc2_w"], c["fc2_b"])),
                     ("residual2", c["y"], c["x1"] + c["f2"])]
            lines.append(f"{layer_op} ffn[{thread}]: " + "; ".join(f"{n} {_rows(a, b)}" for n, a, b in steps))
    return lines


RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"  # tests/conftest.py's


def fair_esm_layer1_bos(path: Path, seqs: list[str]):
    """fair-esm's layer-1 BOS vectors of ``seqs`` (one batch, as tests/conftest.py's
    fair_esm_reference pools them)."""
    import warnings

    import esm
    import torch

    data = torch.load(path, map_location="cpu", weights_only=False)  # written just now, here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data, None)
    _, _, tokens = alphabet.get_batch_converter(1022)([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        return model.eval()(tokens, repr_layers=[1])["representations"][1][:, 0].numpy()


def one_run(collect: bool) -> dict:
    os.chdir(ROOT)
    if collect:
        import pytest
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"], plugins=[])
    import threading

    import numpy as np
    import torch
    from typer.testing import CliRunner

    from gpuengine import EmbeddingStore
    from gpuengine.cli import app
    from gpuengine.synthetic import write_fair_esm_checkpoint

    mxcsr = _mxcsr_reader()
    kept: list = []
    padded_call, _ = _install_capture(kept, mxcsr)  # this process ends after the run
    rng = random.Random(21)  # test_api's SEQS (conftest.random_proteins): one 254-row batch
    seqs = ["".join(rng.choice(RESIDUES) for _ in range(n)) for n in (3, 40, 17, 120, 64)]
    ids = [f"P{i}" for i in range(len(seqs))]
    with tempfile.TemporaryDirectory(prefix="repro-cpu-fidelity-") as tmp:
        root = Path(tmp)
        model = write_fair_esm_checkpoint(root / "esm2_t2_tiny.pt", 2, 64, 4, seed=3)  # TINY
        fasta = root / "p.fasta"
        fasta.write_text("".join(f">{i}\n{s}\n" for i, s in zip(ids, seqs)))
        out = root / "cli.lmdb"
        result = CliRunner().invoke(app, ["embed", str(fasta), "--model", str(model), "--out",
                                          str(out), "--gpus", "cpu", "--layers", "1,-1",
                                          "--pool", "mean,bos", "-q", "--json"])
        if result.exit_code != 0:
            return {"error": result.output[-2000:]}
        with EmbeddingStore(out, layer=1, pool="bos") as store:
            stored = store.get_many(ids)
        ref = fair_esm_layer1_bos(model, seqs)
        diff = float(np.abs(stored - ref).max())
        per_seq = [float(x) for x in np.abs(stored - ref).max(axis=1)]
        found: dict = {}
        worker = threading.Thread(target=lambda: found.__setitem__("ops", _recheck(kept, padded_call)),
                                  name="recheck")
        worker.start()
        worker.join()
    return {"bad": diff > TOL, "diff": diff, "per_sequence": per_seq, "ops": found["ops"],
            "mxcsr": [f"{kind}:{mx:#x}" for kind, _, mx, _ in kept if mx is not None],
            "torch_threads": torch.get_num_threads(), "modules": len(sys.modules)}


# --- the loop (parent) -------------------------------------------------------------------

LOAD_DISK = """
import os, sys, time
path = sys.argv[1]
while True:
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(16 << 20))
        f.flush(); os.fsync(f.fileno())
    os.remove(path)
"""
LOAD_CPU = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def start_load(workdir: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", LOAD_DISK, str(workdir / "load.bin")]),
            subprocess.Popen([sys.executable, "-c", LOAD_CPU])]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--collect", action="store_true", help="full pytest collection first (as CI)")
    ap.add_argument("--load", action="store_true", help="disk writer + torch matmul load meanwhile")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: leave)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    ap.add_argument("--out", type=Path, help="append JSON rows here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("REPRO " + json.dumps(one_run(args.collect)), flush=True)
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--env wants KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        env[key] = value
    config = {"collect": args.collect, "load": args.load, "threads": args.threads, "env": args.env}
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="repro-cpu-fidelity-load-") as workdir:
        load = start_load(Path(workdir)) if args.load else []
        try:
            for i in range(args.runs):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one"]
                cmd += ["--collect"] if args.collect else []
                started = time.monotonic()
                try:
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                          timeout=args.timeout)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPRO ")]
                    run = json.loads(line[-1][6:]) if line else {"error": proc.stderr[-2000:]}
                except subprocess.TimeoutExpired:
                    run = {"error": f"timed out after {args.timeout} s"}
                run.update(system="repro-cpu-fidelity", run=i, seconds=round(time.monotonic() - started, 2),
                           **config)
                bad += bool(run.get("bad"))
                rows.append(run)
                flag = "BAD" if run.get("bad") else ("ERR" if "error" in run else "ok")
                print(f"{flag} run {i} diff {run.get('diff', float('nan')):.3e}"
                      + ("".join(f"\n    {op}" for op in run.get("ops", [])) if flag != "ok" else ""),
                      flush=True)
                if flag == "ERR":
                    print(run["error"], file=sys.stderr)
        finally:
            stop_load(load)
    summary = {"system": "repro-cpu-fidelity-summary", "runs": len(rows), "bad": bad,
               "errors": sum("error" in r for r in rows), **config}
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            for row in rows + [summary]:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
