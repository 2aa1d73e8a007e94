"""Work items hold their token ids as little-endian int32 ``bytes``: what the constructor,
the planner and a runner's ``stage`` make of them (the ids a model sees are the tokenizer's,
exactly)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gpuengine import inputs
from gpuengine.ledger import Ledger
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.packing import ItemBlock, WorkItem
from gpuengine.planner import Planner
from gpuengine.pooling import PoolingRule
from gpuengine.runner import Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec
from gpuengine.store.writer import StoreWriter
from gpuengine.tokenization import EsmTokenizer

from conftest import random_proteins


@pytest.mark.parametrize("ids", [np.array([0, 70000, 2], np.int64), np.array([0, 5, 2], ">i4"),
                                 [0, 5, 6, 2], np.arange(12, dtype=np.int32)[::3]])
def test_a_work_item_keeps_its_ids_as_little_endian_int32_bytes(ids):
    item = WorkItem(b"d" * 16, ids, 7)
    expected = np.asarray(ids).astype("<i4")
    assert item.token_bytes == expected.tobytes()
    assert item.n_tokens == expected.size and item.residues == 7 and item.keys == ()
    np.testing.assert_array_equal(item.token_ids, expected)
    assert item.token_ids.dtype == np.dtype("<i4") and not item.token_ids.flags.writeable


def _table() -> TableSpec:
    return TableSpec("default", ModelIdentity("esm", "items", "0" * 64, 1, 8, 1, 32),
                     (OutputSpec(1, "mean"),), "float32", 8, None)


def test_the_planner_hands_on_each_new_records_token_ids(tmp_path):
    """Repeats and ids already stored leave gaps (the planner's per-row path); every item the
    scheduler gets carries exactly its record's ids, residues and key."""
    tok, spec = EsmTokenizer(), _table()
    seqs = random_proteins([5, 40, 1, 17, 40, 300, 2], seed=4)
    seqs[4] = seqs[1]  # a repeat: an alias, no item
    ids = [f"p{i}" for i in range(len(seqs))]
    prefixes = [spec.embedding_key_prefix(spec.outputs[0])]
    chunk = inputs.decode_chunk(bytearray(b"".join(bytes(p) for p in inputs.encode_chunk(
        inputs.prepare_lists(ids, seqs, tok, 20, key_prefixes=prefixes))[1:])))
    submitted: list[WorkItem] = []
    with StoreWriter(tmp_path / "s.lmdb") as writer:
        writer.open_table(spec)
        planner = Planner(ledger=Ledger(), lookup=writer.lookup(spec.name),
                          submit=lambda items, n_tokens: submitted.extend(items),
                          alias=lambda pairs: None,
                          stop=threading.Event(), expected_records=len(seqs))
        planner.run([chunk])
    new = [0, 1, 2, 3, 5, 6]
    assert sorted(item.digest for item in submitted) == sorted(chunk.digests[i] for i in new)
    by_digest = {item.digest: item for item in submitted}
    for i in new:
        item = by_digest[chunk.digests[i]]
        np.testing.assert_array_equal(item.token_ids, tok.encode(seqs[i], 20))
        assert item.token_bytes == chunk.token_ids(i).astype("<i4").tobytes()
        assert item.n_tokens == min(len(seqs[i]), 20) + 2 == chunk.token_ids(i).size
        assert item.residues == min(len(seqs[i]), 20)
        assert item.keys == (chunk.embedding_keys[0][i],)
    assert planner.counts.tokens_new == sum(item.n_tokens for item in submitted)


@pytest.mark.parametrize("as_block", [False, True], ids=["items", "block"])
def test_stage_packs_a_batch_of_the_items_ids_in_order(tiny_pt, as_block):
    cfg, state, _ = read_fair_esm_checkpoint(tiny_pt)
    runner = Runner(build_esm2(cfg, state, torch.float32), torch.device("cpu"), "fp32",
                    [OutputSpec(2, "mean")], PoolingRule(1, 1))
    tok = EsmTokenizer()
    seqs = random_proteins([3, 50, 1, 11], seed=5)
    items = [WorkItem(sequence_digest(s), tok.encode(s), len(s)) for s in seqs]
    staged = runner.stage(ItemBlock.of(items) if as_block else items)
    expected = np.concatenate([tok.encode(s) for s in seqs]).astype(np.int32)
    assert staged.ids.dtype == torch.int32
    np.testing.assert_array_equal(staged.ids.numpy(), expected)
    np.testing.assert_array_equal(staged.lengths_host, [len(s) + 2 for s in seqs])
    assert staged.total == expected.size and staged.max_len == 52
