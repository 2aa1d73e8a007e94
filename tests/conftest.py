"""Shared fixtures and helpers: tiny random-weight checkpoints in the official formats, fair-esm's
own model loaded from them as the reference, random proteins, FASTA files and the fp32 parity
check (``assert_close``, tolerance ``TOL``).

Helpers shared by several test modules live here or in a helper module named for what it holds
(test modules never import each other); conftest exposes their fixtures:

* ``cli_runs.py``: ``gpuengine`` commands run in process (``cli``, ``embed``, ``fails``), the
  standard six-protein input and ``snapshot`` of a store (fixtures ``reference``,
  ``standard_store``);
* ``embed_processes.py``: real ``gpuengine embed`` processes started, killed, interrupted and
  rerun to completion (fixture ``resume_workload``);
* ``dnabert_s_reference.py``: an independent reading of the DNABERT-S authors' model;
* ``virnucpro_files.py``: VirNucPro's classifier file as its training script saves it, reads and
  its prediction files;
* ``serve_processes.py``: a real ``gpuengine serve`` process (``Served``) and the inputs
  and store checks the daemon's process tests share;
* ``scheduler_sim.py``: simulated devices around the scheduler on a virtual clock;
* ``store_shards.py``: stores written and split into shards for the merge tests;
* ``store_contents.py``: every key and value of a store's id and embedding databases, read
  with lmdb itself (``store_contents``), and the input with aliases, a long id and an id
  outside ASCII that the byte-level store tests share (``mixed_records``);
* ``slurm_cluster.py``: a real SLURM (fixture ``slurm``);
* ``worker_exits.py``: a device worker that lingers inside torch after its last report;
* ``run_stops.py``: a run stopped right after its first commit, with batches left
  (``stopped_after_first_commit``);
* ``held_process.py``: the entry point of a ``gpuengine`` process held after its first
  batches until a signal halts it (``held_command``, ``held_env``), for tests that signal a
  real process once its first commit is seen;
* ``process_tree.py``: a process's children and whether a process is gone, from /proc;
* ``digest_runner.py``: a stand-in for the model whose vectors come from the digest and
  that lists what it computed;
* ``fastq_files.py``: FASTQ and FASTA text of the same reads;
* ``fp8_helpers.py``: whether this torch runs FP8 on the CPU, tiny and outlier-stress
  checkpoints, an fp8 runner factory for the CPU, a daemon whose runs use it, Triton's CPU
  interpreter;
* ``fake_gpu.py``: a simulated GPU (NVML probe, caching allocator, calibrating runner) for
  the replicas' memory telemetry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuengine.synthetic import write_fair_esm_checkpoint, write_hf_esm
from slurm_cluster import slurm  # noqa: F401  (session fixture: a real SLURM)

TINY = (2, 64, 4)  # layers, dim, heads: head_dim 16
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"


@contextlib.contextmanager
def isolated_cache(cache: Path):
    """gpuengine's cache in ``cache`` and offline, for the block (also in module fixtures,
    which cannot use the function-scoped ``monkeypatch``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUENGINE_CACHE", str(cache))
        mp.setenv("GPUENGINE_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory):
    with isolated_cache(tmp_path_factory.getbasetemp() / "cache"):
        yield


@pytest.fixture(scope="session")
def tiny_pt(tmp_path_factory) -> Path:
    """A 2-layer, d=64 ESM-2 in fair-esm's format (with its contact-regression file)."""
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("w") / "esm2_t2_tiny.pt", *TINY, seed=3)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """The same weights as ``tiny_pt`` as a Hugging Face EsmModel directory."""
    return write_hf_esm(tmp_path_factory.mktemp("w") / "esm2_t2_tiny_hf", *TINY, seed=3)


def fair_esm_model(path: Path):
    """fair-esm's own ESM2, loaded the way its hub/local loaders do (fp32, eval)."""
    import esm

    data = torch.load(path, map_location="cpu", weights_only=False)  # our own test file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data, None)
    return model.eval(), alphabet


def random_proteins(lengths, seed: int = 0, alphabet: str = RESIDUES) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]


def write_fasta(path: Path, records) -> Path:
    with open(path, "w") as handle:
        for rid, seq in records:
            handle.write(f">{rid}\n")
            for i in range(0, len(seq), 60):
                handle.write(seq[i:i + 60] + "\n")
    return path


def fair_esm_reference(path: Path, sequences: list[str], layers: list[int], truncation: int = 1022):
    """{layer: {'mean': (N, d), 'bos': (N, d), 'per-token': [ (L, d) ]}} from fair-esm,
    pooled as its extract.py does."""
    model, alphabet = fair_esm_model(path)
    converter = alphabet.get_batch_converter(truncation)
    out = {layer: {"mean": [], "bos": [], "per-token": []} for layer in layers}
    with torch.no_grad():
        for start in range(0, len(sequences), 8):
            chunk = sequences[start:start + 8]
            _, _, tokens = converter([(str(i), s) for i, s in enumerate(chunk)])
            reps = model(tokens, repr_layers=layers)["representations"]
            for layer in layers:
                for i, seq in enumerate(chunk):
                    n = min(len(seq), truncation)
                    rows = reps[layer][i, 1:n + 1]
                    out[layer]["mean"].append(rows.mean(0).numpy())
                    out[layer]["bos"].append(reps[layer][i, 0].numpy())
                    out[layer]["per-token"].append(rows.numpy())
    for layer in layers:
        out[layer]["mean"] = np.stack(out[layer]["mean"])
        out[layer]["bos"] = np.stack(out[layer]["bos"])
    return out


def embed_in_batches(runner, items, outputs, budget: int) -> dict:
    """Pack items into batches of at most ``budget`` tokens (several sequences per forward,
    like the engine) and collect each output's vectors in item order."""
    results = {o: [] for o in outputs}
    batch: list = []
    for item in list(items) + [None]:
        if item is not None and sum(i.n_tokens for i in batch) + item.n_tokens <= budget:
            batch.append(item)
            continue
        if batch:
            out = runner.embed(batch)
            assert out.finite.all()
            for o in outputs:
                results[o].extend(out.vectors[o])
        batch = [item] if item is not None else []
    return results


TOL = 1e-5
"""fp32 parity with the reference implementations: max |ours - reference| on every value."""


def max_diff(a, b) -> float:
    """max |a - b| in float64 (0 for empty arrays); the shapes must agree."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_close(ours, ref, what: str, tol: float = TOL) -> None:
    """Every value of ``ours`` within ``tol`` of ``ref``; on failure the first values of both."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = max_diff(ours, ref)
    assert diff <= tol, (f"{what}: max |diff| {diff:.3g} > {tol}\n ours {ours.ravel()[:6]}\n"
                         f"  ref {ref.ravel()[:6]}")


def embed_esm2_with_runner(model, sequences, outputs, budget: int = 4096) -> dict:
    """``sequences`` through a fp32 CPU :class:`~gpuengine.runner.Runner` of the packed ESM-2
    ``model`` (fair-esm's truncation at 1022), packed by :func:`embed_in_batches`."""
    from gpuengine.packing import WorkItem
    from gpuengine.pooling import PoolingRule
    from gpuengine.runner import Runner
    from gpuengine.store.codec import sequence_digest
    from gpuengine.tokenization import EsmTokenizer

    tok = EsmTokenizer()
    items = [WorkItem(sequence_digest(s), tok.encode(s, 1022), min(len(s), 1022))
             for s in sequences]
    runner = Runner(model, torch.device("cpu"), "fp32", outputs, PoolingRule(1, 1))
    return embed_in_batches(runner, items, outputs, budget)


def make_item(tag: str, n_tokens: int):
    """A :class:`~gpuengine.packing.WorkItem` of ``n_tokens`` zero tokens, its digest made of
    ``tag`` (for the scheduler, the worker and the engine without a model)."""
    from gpuengine.packing import WorkItem

    digest = hashlib.blake2b(tag.encode(), digest_size=16).digest()
    return WorkItem(digest, np.zeros(n_tokens, dtype=np.int32), max(0, n_tokens - 2))


def digests(items) -> tuple[bytes, ...]:
    return tuple(item.digest for item in items)


def cost_of(items, padded: bool = False) -> int:
    """What a batch of ``items`` costs against a token budget (padded: n x longest)."""
    from gpuengine.packing import batch_cost

    return batch_cost(len(items), sum(i.n_tokens for i in items), max(i.n_tokens for i in items),
                      padded)


def datagram_socket(address: str) -> socket.socket:
    """A bound AF_UNIX datagram socket at a path or, for ``@name``, in the abstract namespace
    (where systemd's NOTIFY_SOCKET points)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(5)
    return sock


def rename_without_evidence(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` the way a writer that renames in the same clock tick as
    its last write looks to the daemon: ctime not later than mtime, mtime not older than the
    previous poll (here: mtime set a minute ahead, as NFS clock skew does too)."""
    ahead = time.time_ns() + 60 * 10**9
    os.utime(source, ns=(ahead, ahead))
    os.replace(source, target)
    st = target.stat()
    assert st.st_ctime_ns <= st.st_mtime_ns  # the daemon's rename evidence is absent


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def no_model_build(monkeypatch):
    """Records every model build (the packed ESM-2 replica), which input errors must precede."""
    import gpuengine.models.esm2_weights as weights

    calls = []
    real = weights.build_esm2

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "build_esm2", spy)
    return calls


@pytest.fixture(scope="session")
def reference(tiny_pt):
    """fair-esm's outputs of the standard input (``cli_runs.SEQS``) at every layer of
    ``tiny_pt`` (truncation 1022): {layer: {'mean', 'bos', 'per-token'}}."""
    from cli_runs import LAST, SEQS

    return fair_esm_reference(tiny_pt, SEQS, list(range(LAST + 1)))


@pytest.fixture(scope="session")
def standard_store(tiny_pt, tmp_path_factory) -> dict:
    """The standard input embedded once by ``gpuengine embed`` with default options:
    {'path', 'fasta', 'summary', 'stderr'}. Read-only: a test that writes copies it first."""
    from cli_runs import embed_standard_input

    return embed_standard_input(tiny_pt, tmp_path_factory.mktemp("standard-store"))


@pytest.fixture(scope="session")
def resume_workload(tiny_pt, tmp_path_factory) -> dict:
    """The input of the kill-and-resume tests and every id's vector from one uninterrupted
    run: {'fasta', 'ids', 'vectors'} (see ``embed_processes``)."""
    from embed_processes import make_workload

    return make_workload(tiny_pt, tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="session")
def predict_models(tmp_path_factory):
    """The tiny ``gpuengine predict`` models: (esm, dna, mlp, mlp_path), see
    ``virnucpro_files.write_predict_models``. Read-only."""
    from virnucpro_files import write_predict_models

    return write_predict_models(tmp_path_factory.mktemp("predict-models"))
