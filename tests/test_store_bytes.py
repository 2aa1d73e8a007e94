"""The store a run writes holds exactly the bytes the per-record encoders give.

The engine's hot path encodes whole chunks and batches at once (embedding keys computed by
the input processes, id keys and vectors encoded column-wise, keys sorted by numpy); this
test writes a store through it, from FASTA read in the planner's thread and in several input
processes, with devices that return each batch's vectors as a list of rows or as one 2-D
array, then reads every key and value of the table back with lmdb itself and compares them
with what the one-record functions (`codec.encode_id`, `codec.encode_id_value`,
`TableSpec.embedding_key`, `codec.encode_array`) give for the same input: repeats (aliases),
a resume over a store already holding part of the input, a long id (its hashed key form),
an id outside ASCII, sequences cut to ``max_residues``, two pooled outputs and both store
dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_fasta
from digest_runner import DigestRunner
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.runner import EmbeddedBatch
from gpuengine.store import codec
from gpuengine.store.schema import emb_db_name, ids_db_name
from gpuengine.store.writer import StoreWriter
from store_contents import mixed_records, store_contents

MAX_RESIDUES = 40


class StackedDigestRunner(DigestRunner):
    """The digest-derived vectors as one (items, dim) array per output, as the real runner
    hands pooled vectors on."""

    def finish(self, items):
        result = super().finish(items)
        return EmbeddedBatch({o: np.stack(rows) for o, rows in result.vectors.items()},
                             result.finite, result.n_tokens, result.seconds)


def _vector(digest: bytes) -> np.ndarray:
    return np.frombuffer(digest * 4, np.uint8).astype(np.float32)  # DigestRunner's


def _expected(path, table: str, records, store_dtype: str) -> dict[str, dict[bytes, bytes]]:
    with StoreWriter(path) as writer:
        spec = writer.stored_spec(table)
    ids, emb = {}, {}
    for record_id, sequence in records:
        digest = codec.sequence_digest(sequence[:MAX_RESIDUES])
        ids[codec.encode_id(record_id)] = codec.encode_id_value(record_id, digest)
        for output in spec.outputs:
            emb[spec.embedding_key(output, digest)] = codec.encode_array(_vector(digest),
                                                                        store_dtype)
    return {ids_db_name(table): ids, emb_db_name(table): emb}


@pytest.mark.parametrize("input_process,stacked,store_dtype", [
    (False, False, "float32"), (True, True, "float16"), (True, False, "float32")])
def test_store_bytes_equal_the_per_record_encoding(tmp_path, tiny_pt, monkeypatch,
                                                   input_process, stacked, store_dtype):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "3000")  # several blocks per child
    first, more = mixed_records(240, seed=1), mixed_records(90, seed=2)
    out = tmp_path / "s.lmdb"
    computed: list[bytes] = []
    runner = StackedDigestRunner if stacked else DigestRunner

    def run(records, name):
        config = EmbedConfig(inputs=(write_fasta(tmp_path / name, records),),
                             model=str(tiny_pt), out=out, pools=("mean", "bos"),
                             max_residues=MAX_RESIDUES, store_dtype=store_dtype,
                             max_tokens=256, commit_every=50, input_process=input_process)
        return run_embed(config, runner_factory=lambda d, p, o: runner(o, computed))

    run(first[:150], "a.fa")
    summary = run(first + more, "b.fa")  # a resume over the first 150, and new records
    assert summary.already_stored == 150 and summary.committed_records == len(first) + len(more) - 150
    assert len(computed) == len(set(computed)), "a sequence was computed twice"
    stored = store_contents(out, summary.table)
    expected = _expected(out, summary.table, first + more, store_dtype)
    for name in expected:
        assert stored[name].keys() == expected[name].keys(), name
        assert stored[name] == expected[name], name
    assert codec.LONG_ID_PREFIX + codec.blake2b16(b"L" * 600 + b"2") in stored[ids_db_name(summary.table)]


def test_sorted_by_key_is_the_stable_sort_of_bytes():
    rng = np.random.default_rng(5)
    keys = [rng.bytes(16) for _ in range(300)]
    keys += [b"\x00" * 16, b"\xff" * 16, b"\x00" * 15 + b"\x01", b"\x01" + b"\x00" * 15]
    keys += keys[:50]  # equal keys keep their order
    pairs = [(k, i) for i, k in enumerate(keys)]
    assert codec.sorted_by_key(pairs) == sorted(pairs, key=lambda p: p[0])
    mixed = [(b"b", 1), (b"a" * 20, 2), (b"a", 3)]  # not all 16 bytes: the plain sort
    assert codec.sorted_by_key(mixed) == sorted(mixed, key=lambda p: p[0])


def test_encode_id_pairs_is_encode_id_pair_of_each():
    digests = [bytes([i]) * 16 for i in range(5)]
    ids = ["a", "séq", "x" * 600, "b" * 511, "c" * 512]
    assert codec.encode_id_pairs(ids, digests) == [
        codec.encode_id_pair(i, d) for i, d in zip(ids, digests)]
    assert codec.encode_id_pairs(["a", "b"], digests[:2]) == [(b"a", digests[0]), (b"b", digests[1])]
    with pytest.raises(ValueError, match="non-empty string"):
        codec.encode_id_pairs(["a", ""], digests[:2])
