"""Model families as data: how to read, build, tokenize and pool each one.

The engine never branches on the family; it asks the registry. Adding a family means adding one
:class:`Family` entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gpuengine.errors import ModelLoadError
from gpuengine.models.sources import ModelSource
from gpuengine.pooling import PoolingRule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """A model's config and host-side state dict, read once and copied to every device."""

    source: ModelSource
    config: Any
    state: dict[str, torch.Tensor]
    synthetic: bool
    """True for random-weight checkpoints written by :mod:`gpuengine.synthetic`."""

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def attention_heads(self) -> int:
        return self.config.attention_heads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


@dataclass(frozen=True)
class Family:
    name: str
    alphabet: frozenset[str]
    """Characters a sequence may hold (checked before any model loads)."""
    pooling_rule: PoolingRule
    default_max_residues: int | None
    gpu_precision: str
    """Default precision on a GPU (fp16 for ESM-2, its training precision)."""
    read: Callable[[ModelSource], Weights]
    build: Callable[[Weights, torch.dtype], torch.nn.Module]
    tokenizer: Callable[[ModelSource], Any]


def _read_esm2(source: ModelSource) -> Weights:
    from gpuengine.models.esm2_weights import read_fair_esm_checkpoint, read_hf_esm

    if source.format == "fair-esm":
        cfg, state, synthetic = read_fair_esm_checkpoint(source.path)
    else:
        cfg, state = read_hf_esm(source.path)
        synthetic = "gpuengine_synthetic" in (source.path / "config.json").read_text()
    return Weights(source, cfg, state, synthetic)


def _build_esm2(weights: Weights, dtype: torch.dtype) -> torch.nn.Module:
    from gpuengine.models.esm2_weights import build_esm2

    return build_esm2(weights.config, weights.state, dtype)


def _esm_tokenizer(source: ModelSource) -> Any:
    from gpuengine.tokenization import EsmTokenizer

    return EsmTokenizer()


def _esm_alphabet() -> frozenset[str]:
    from gpuengine.tokenization import ESM_RESIDUES

    return ESM_RESIDUES


def _read_dnabert_s(source: ModelSource) -> Weights:
    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    cfg, state, synthetic = read_dnabert_s(source.path)
    return Weights(source, cfg, state, synthetic)


def _build_dnabert_s(weights: Weights, dtype: torch.dtype) -> torch.nn.Module:
    from gpuengine.models.dnabert_s_weights import build_dnabert_s

    return build_dnabert_s(weights.config, weights.state, dtype)


def _dna_tokenizer(source: ModelSource) -> Any:
    from gpuengine.dna_tokenizer import DnaTokenizer

    return DnaTokenizer.from_directory(source.path)


def _dna_alphabet() -> frozenset[str]:
    from gpuengine.dna_tokenizer import DNA_ALPHABET

    return DNA_ALPHABET


FAMILIES: dict[str, Family] = {
    "esm2": Family(
        name="esm2",
        alphabet=_esm_alphabet(),
        pooling_rule=PoolingRule(lead=1, trail=1),  # residues only: BOS and EOS excluded
        default_max_residues=1022,
        gpu_precision="fp16",
        read=_read_esm2,
        build=_build_esm2,
        tokenizer=_esm_tokenizer,
    ),
    "dnabert-s": Family(
        name="dnabert-s",
        alphabet=_dna_alphabet(),  # A C G T, N and IUPAC codes (non-ACGT → one [UNK] each)
        pooling_rule=PoolingRule(lead=0, trail=0),  # mean over all tokens, CLS and SEP included
        default_max_residues=None,  # no truncation
        gpu_precision="fp16",
        read=_read_dnabert_s,
        build=_build_dnabert_s,
        tokenizer=_dna_tokenizer,
    ),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
