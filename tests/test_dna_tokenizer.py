"""``DnaTokenizer.encode_flat`` (the input side's DNA path): the BPE model asked directly where
``tokenizer.json`` adds nothing else, else the whole pipeline; the same ids either way."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from gpuengine.dna_tokenizer import DnaTokenizer
from gpuengine.errors import InternalError
from gpuengine.synthetic import write_dnabert_s


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    root = write_dnabert_s(tmp_path_factory.mktemp("dnatok") / "dnabert", num_layers=1,
                           embed_dim=32, heads=2, intermediate=64, seed=1)
    return root / "tokenizer.json"


def _sequences(n=300, seed=3):
    rng = random.Random(seed)
    seqs = ["".join(rng.choice("ACGT") for _ in range(rng.randint(1, 300))) for _ in range(n)]
    seqs += ["ACGNT", "NN", "acgtRYKM", "A", "N"]
    return seqs


def _by_pipeline(tok: DnaTokenizer, seqs):
    ids = tok.encode_batch(seqs)
    return np.concatenate(ids), np.cumsum([len(t) for t in ids])


def test_flat_ids_equal_the_whole_pipeline(tokenizer_file):
    tok = DnaTokenizer(tokenizer_file)
    assert tok._bpe is not None  # the synthetic file is the hub file's plain BPE
    seqs = _sequences()
    flat, ends = tok.encode_flat(seqs)
    ref_flat, ref_ends = _by_pipeline(tok, seqs)
    assert flat.dtype == np.int32 and ends.dtype == np.int64
    assert np.array_equal(flat, ref_flat) and np.array_equal(ends, ref_ends)
    empty = tok.encode_flat([])
    assert empty[0].size == 0 and empty[1].size == 0


def test_a_pipeline_with_more_steps_falls_back_to_it(tokenizer_file, tmp_path):
    spec = json.loads(tokenizer_file.read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # not a plain BPE any more
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(spec))
    tok = DnaTokenizer(other)
    assert tok._bpe is None
    seqs = _sequences(40)
    flat, ends = tok.encode_flat(seqs)
    ref_flat, ref_ends = _by_pipeline(tok, seqs)
    assert np.array_equal(flat, ref_flat) and np.array_equal(ends, ref_ends)


def test_an_unvalidated_character_is_an_internal_error(tokenizer_file):
    with pytest.raises(InternalError, match="'U'"):
        DnaTokenizer(tokenizer_file).encode_flat(["ACGT", "ACUG"])
