"""Shared fixtures: tiny random-weight checkpoints in the official formats, and fair-esm's own
model loaded from them as the reference."""

from __future__ import annotations

import contextlib
import random
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
