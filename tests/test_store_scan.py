"""Iterating a store in chunks (``EmbeddingStore._entries``, which a single store's ``ids`` and
``items`` and every member of a ``MultiStore`` read through): with chunks of a few entries, a
store of 46 records crosses many chunk boundaries, ends on one exactly, and reads every id
once, in key order, with its array; a union of two stores reads as one and still refuses
an id whose sequences differ when the clash lies chunks into the scan."""

from __future__ import annotations

import pytest

from gpuengine.errors import StoreMismatchError
from gpuengine.store import EmbeddingStore, reader
from gpuengine.store.codec import encode_id
from store_shards import MEAN, make_spec, records, write_store

SPEC = make_spec()
RECS = records(40)  # 40 records and 6 aliases


@pytest.fixture(params=[(5, 3), (23, 2), (46, 46), (1024, 128)],
                ids=["5-3", "23-2", "exact", "default"])
def chunks(request, monkeypatch):
    """Chunk sizes (ids, items): the 46 ids end mid-chunk, on a chunk boundary (23, 2 and
    46) and within the first chunk (the defaults)."""
    ids, items = request.param
    monkeypatch.setattr(reader, "_ITER_CHUNK", ids)
    monkeypatch.setattr(reader, "_ITEMS_CHUNK", items)
    return request.param


def key_order(ids):
    return sorted(ids, key=encode_id)


def test_one_store_reads_every_id_once_in_key_order(tmp_path, chunks):
    path = write_store(tmp_path / "s.lmdb", SPEC, RECS)
    with EmbeddingStore(path, layer=MEAN.layer, pool=MEAN.pool) as store:
        expected = key_order(rid for rid, _ in RECS)
        assert list(store.ids()) == expected
        pairs = list(store.items())
        assert [rid for rid, _ in pairs] == expected
        for rid, array in pairs:
            assert array.tobytes() == store[rid].tobytes()


def test_a_union_reads_as_one_store_and_refuses_a_late_conflict(tmp_path, chunks):
    a = write_store(tmp_path / "a.lmdb", SPEC, RECS[:30])
    b = write_store(tmp_path / "b.lmdb", SPEC, RECS[20:])  # 10 records in both
    with EmbeddingStore([a, b]) as union:
        assert list(union.ids()) == key_order(rid for rid, _ in RECS)
        assert [rid for rid, _ in union.items()] == list(union.ids())
    last = key_order(rid for rid, _ in RECS[:30])[-1]  # the last id of a's scan
    c = write_store(tmp_path / "c.lmdb", SPEC, [(last, "MKVWWW")])
    with EmbeddingStore([a, c]) as union:
        with pytest.raises(StoreMismatchError, match=repr(last)):
            list(union.ids())
