"""The engine's commit path at C speed: a batch's embedding keys column-wise
(``engine.key_columns``), the checks of :class:`CommitRows`, the column-wise split of a
group by part store (``writer_parts.split_group``) and ``pipe_frames.write_all`` of many
buffers through a pipe that takes less than it is given."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from gpuengine.engine import key_columns
from gpuengine.errors import InternalError
from gpuengine.packing import WorkItem
from gpuengine.pipe_frames import write_all
from gpuengine.store.codec import Packed16, sequence_digest, unpack16
from gpuengine.store.commit_group import CommitEntry, CommitRows, encode_for_commit
from gpuengine.store.group_frames import decode_group, encode_group, split_payload
from gpuengine.store.parts import parts_of
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec
from gpuengine.committer import CommitCounts
from gpuengine.ledger import Ledger
from gpuengine.store.reader import EmbeddingStore
from gpuengine.store.writer import StoreWriter
from gpuengine.writer_parts import PartedCommitter, _PartCommits, split_group

OUT = OutputSpec(6, "mean")
TOKENS = OutputSpec(6, "per-token")
BOS = OutputSpec(6, "bos")
MODEL = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32, num_layers=6,
                      embed_dim=4, attention_heads=4, vocab_size=33)


def _digests(count: int) -> list[bytes]:
    return [sequence_digest(f"SEQ{i}") for i in range(count)]


def _item(digest: bytes, keys: tuple[bytes, ...]) -> WorkItem:
    return WorkItem(digest, np.zeros(3, np.int32), 1, keys)


# ----------------------------------------------------------------------------- key columns


def test_key_columns_are_the_items_keys_per_output():
    digests = _digests(5)
    items = [_item(d, (bytes([i]) * 16, bytes([100 + i]) * 16)) for i, d in enumerate(digests)]
    columns = key_columns(items)
    assert [type(c) for c in columns] == [Packed16, Packed16]
    assert [list(c) for c in columns] == [[bytes([i]) * 16 for i in range(5)],
                                          [bytes([100 + i]) * 16 for i in range(5)]]
    assert [list(c) for c in key_columns(items[:1])] == [[b"\x00" * 16], [b"\x64" * 16]]


def test_key_columns_refuse_a_key_that_is_not_16_bytes():
    digests = _digests(3)
    items = [_item(d, (bytes([i]) * 16,)) for i, d in enumerate(digests)]
    items[1] = _item(digests[1], (b"short",))
    with pytest.raises(InternalError, match="not 16 bytes"):
        key_columns(items)


def test_key_columns_are_none_unless_every_item_has_them():
    digests = _digests(4)
    assert key_columns([]) == ()
    assert key_columns([_item(d, ()) for d in digests]) == ()
    keyed = [_item(d, (bytes([i]) * 16,)) for i, d in enumerate(digests)]
    assert key_columns([*keyed[:2], _item(digests[2], ()), keyed[3]]) == ()
    assert key_columns([_item(digests[0], ()), *keyed[1:]]) == ()


# ----------------------------------------------------------------------------- Packed16


def test_packed16_reads_as_the_list_of_its_values():
    values = [bytes([i]) * 15 + b"\x00" for i in range(7)] + [b"\x00" * 16]  # NULs kept
    packed = Packed16(b"".join(values))
    assert len(packed) == 8 and list(packed) == values and packed.unpacked() == values
    assert [packed[i] for i in range(-8, 8)] == values + values
    assert packed[2:5] == Packed16(b"".join(values[2:5])) and list(packed[::3]) == values[::3]
    assert list(packed[5:2]) == [] and b"\x00" * 16 in packed
    assert packed.take(np.array([6, 0, 6])) == Packed16(values[6] + values[0] + values[6])
    assert unpack16(memoryview(packed.data)[16:48]) == values[1:3]
    with pytest.raises(IndexError):
        packed[8]
    for bad in (b"\x01" * 15, bytearray(16), "x" * 16):
        with pytest.raises(ValueError, match="multiple of 16"):
            Packed16(bad)


def test_packed_keys_give_the_frame_and_the_store_bytes_of_listed_keys():
    spec = TableSpec(name="default", model=MODEL, outputs=(OUT, BOS), store_dtype="float16",
                     dim=4, max_residues=1022)
    digests = _digests(9)
    listed = tuple([spec.embedding_key(o, d) for d in digests] for o in spec.outputs)
    vectors = {OUT: np.arange(36, dtype=np.float32).reshape(9, 4),
               BOS: np.ones((9, 4), np.float32)}
    ids = [(f"id{i}",) for i in range(9)]

    def group(keys):
        return [CommitRows(digests, ids, vectors, keys), CommitEntry(digests[2], ("alias",), None)]

    packed = tuple(Packed16(b"".join(column)) for column in listed)
    frame_of = [b"".join(bytes(memoryview(b).cast("B")) for b in encode_group(group(k), None))
                for k in (listed, packed)]
    assert frame_of[0] == frame_of[1]
    (back, _) = decode_group(*split_payload(bytearray(frame_of[1])), spec.outputs)
    assert [list(k) for k in back.embedding_keys] == list(listed)
    want, got = encode_for_commit(spec, group(listed)), encode_for_commit(spec, group(packed))
    assert [(k, bytes(memoryview(v).cast("B"))) for k, v in got.arrays] == \
        [(k, bytes(memoryview(v).cast("B"))) for k, v in want.arrays]
    assert got.ids == want.ids and got.aliases == want.aliases and got.nbytes == want.nbytes


# ----------------------------------------------------------------------------- CommitRows


@pytest.mark.parametrize("bad", ["0123456789abcdef", b"\x01" * 15, b"\x01" * 17,
                                 bytearray(16), memoryview(b"\x01" * 16), None])
def test_commit_rows_refuse_a_digest_that_is_not_16_bytes(bad):
    digests = _digests(6)
    digests[4] = bad
    with pytest.raises(InternalError, match="16-byte digests"):
        CommitRows(digests, [(f"id{i}",) for i in range(6)], {OUT: np.zeros((6, 4))})


def test_commit_rows_refuse_columns_of_other_lengths_and_a_row_without_ids():
    digests, ids = _digests(3), [("a",), ("b",), ("c",)]
    with pytest.raises(InternalError, match="must all be as many"):
        CommitRows(digests, ids[:2], {OUT: np.zeros((3, 4))})
    with pytest.raises(InternalError, match="must all be as many"):
        CommitRows(digests, ids, {OUT: np.zeros((2, 4))})
    with pytest.raises(InternalError, match="embedding keys"):
        CommitRows(digests, ids, {OUT: np.zeros((3, 4))}, ([b"k" * 16] * 2,))
    with pytest.raises(InternalError, match="names no record id"):
        CommitRows(digests, [("a",), (), ("c",)], {OUT: np.zeros((3, 4))})


def test_packed_digests_are_the_digests_joined_once():
    digests = _digests(5)
    rows = CommitRows(digests, [(f"id{i}",) for i in range(5)], {OUT: np.zeros((5, 4))})
    packed = rows.packed_digests()
    assert packed == b"".join(digests) and rows.packed_digests() is packed
    assert rows == CommitRows(digests, [(f"id{i}",) for i in range(5)], rows.vectors)
    cut = CommitRows.of_checked(Packed16(packed)[1:3], rows.record_ids[1:3], {OUT: []})
    assert cut.packed_digests() == b"".join(digests[1:3]) and len(cut) == 2


# ----------------------------------------------------------------------------- part split


@pytest.mark.parametrize("count", [2, 3, 5])
def test_each_part_gets_its_rows_in_the_batch_order_with_their_columns(count):
    n = 300
    digests = _digests(n)
    vectors = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    per_token = [np.full((1 + i % 3, 4), i, np.float32) for i in range(n)]
    keys = ([bytes([i % 256]) * 16 for i in range(n)],
            Packed16(b"".join(bytes([(i + 7) % 256]) * 16 for i in range(n))))
    ids = [tuple(f"id{i}_{j}" for j in range(1 + i % 2)) for i in range(n)]
    rows = CommitRows(digests, ids, {OUT: vectors, TOKENS: per_token}, keys)
    owners = parts_of(digests, count).tolist()
    shares = split_group([rows], count)
    assert len(shares) == count
    for index, share in enumerate(shares):
        want = [i for i in range(n) if owners[i] == index]
        if not want:
            assert share == []
            continue
        (part,) = share
        assert list(part.seq_digests) == [digests[i] for i in want]  # the batch's order
        assert list(part.record_ids) == [ids[i] for i in want]
        assert [type(k) for k in part.embedding_keys] == [list, Packed16]  # as they came
        assert [list(k) for k in part.embedding_keys] == [[k[i] for i in want] for k in keys]
        assert np.array_equal(np.asarray(part.vectors[OUT]), vectors[want])
        assert [a is per_token[i] for a, i in zip(part.vectors[TOKENS], want)] == [True] * len(want)


def test_a_batch_of_one_part_is_handed_on_as_it_is():
    digests = [d for d in _digests(200) if parts_of([d], 2)[0] == 1][:20]
    rows = CommitRows(digests, [(f"id{i}",) for i in range(20)], {OUT: np.zeros((20, 4))})
    assert split_group([rows], 2) == [[], [rows]]


# ----------------------------------------------------------------------------- write_all


def test_write_all_writes_every_buffer_in_order_through_a_small_pipe():
    rng = np.random.default_rng(3)
    buffers = [rng.integers(0, 256, int(size), dtype=np.uint8)
               for size in rng.integers(0, 3000, 1500)]  # empty ones too; > one writev's 512
    buffers += [b"", bytearray(b"tail"), memoryview(np.arange(10, dtype=np.float32))]
    want = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
    read_fd, write_fd = os.pipe()  # 64 KiB: writev takes part of what it is given, often
    got = bytearray()

    def drain():
        while chunk := os.read(read_fd, 4096):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_all(write_fd, buffers)
    finally:
        os.close(write_fd)
        reader.join()
        os.close(read_fd)
    assert len(want) > 1 << 20 and bytes(got) == want


# ----------------------------------------------------------------------------- parted ledger


class _FakePart:
    """A part's writer that commits when told to (its snapshot counts what it committed)."""

    def __init__(self) -> None:
        self.shares: list = []
        self.committed = 0

    def put(self, share, extra_runs=None) -> None:
        self.shares.append(share)

    def snapshot(self) -> CommitCounts:
        return CommitCounts(groups=self.committed)


def _claimed(ledger: Ledger, digests: list[bytes]) -> list[tuple[str, ...]]:
    ledger.claim_many([(d, d.hex()) for d in digests], lambda ds: [False] * len(ds))
    return ledger.to_committing_many(digests)


def test_a_parted_group_is_released_from_the_ledger_once_every_part_committed(tmp_path):
    spec = TableSpec(name="default", model=MODEL, outputs=(OUT,), store_dtype="float32",
                     dim=4, max_residues=1022)
    ledger = Ledger()
    parted = PartedCommitter([tmp_path / "a", tmp_path / "b"], spec, "run", ledger,
                             map_sizes=[1 << 20, 1 << 20])
    parted.writers = parts = [_FakePart(), _FakePart()]  # never started: no child
    first, second = _digests(40)[:20], _digests(40)[20:]
    for digests in (first, second):
        ids = _claimed(ledger, digests)
        parted.put([CommitRows(digests, ids, {OUT: np.zeros((20, 4), np.float32)})])
    assert [len(p.shares) for p in parts] == [2, 2]
    assert ledger._committing == set(first + second)
    parts[0].committed = 2  # part 0 has both groups durable, part 1 none
    assert parted.snapshot().groups == 0 and ledger._committing == set(first + second)
    parts[1].committed = 1
    assert parted.snapshot().groups == 1 and ledger._committing == set(second)
    parts[1].committed = 2  # the acknowledgement path settles without a snapshot
    _PartCommits(parted).committed(iter(()))
    assert ledger._committing == set() and parted.snapshot().groups == 2


def test_parted_writer_processes_release_every_digest_once_durable(tmp_path):
    spec = TableSpec(name="default", model=MODEL, outputs=(OUT,), store_dtype="float32",
                     dim=4, max_residues=1022)
    paths = [tmp_path / "p0.lmdb", tmp_path / "p1.lmdb"]
    for path in paths:
        with StoreWriter(path) as writer:
            writer.open_table(spec)
            writer.begin_run("run", {"command": "test"})
    ledger = Ledger()
    parted = PartedCommitter(paths, spec, "run", ledger, map_sizes=[1 << 24, 1 << 24])
    digests = _digests(300)
    try:
        parted.start()
        for at in range(0, 300, 60):
            batch = digests[at:at + 60]
            keys = (Packed16(b"".join(spec.embedding_key(OUT, d) for d in batch)),)
            parted.put([CommitRows(batch, _claimed(ledger, batch),
                                   {OUT: np.full((60, 4), at, np.float32)}, keys)])
        parted.wait_idle()
        assert parted.snapshot().groups == 5 and parted.error is None
        assert ledger._committing == set()
    finally:
        parted.finish()
    owners = parts_of(digests, 2).tolist()
    for index, path in enumerate(paths):
        with EmbeddingStore(path) as store:
            assert sorted(store.ids()) == sorted(d.hex() for d, o in zip(digests, owners)
                                                 if o == index)
            for i, d in enumerate(digests):
                if owners[i] == index:
                    assert store[d.hex()].tolist() == [float(i - i % 60)] * 4
