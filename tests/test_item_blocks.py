"""Work items held column-wise (:class:`ItemBlock`): what the planner submits, the scheduler
sorts and cuts, a runner stages and the engine loop commits, with no object per item. A block
read item by item must be exactly the work items it stands for, whatever was done to it."""

from __future__ import annotations

import numpy as np
import pytest

from gpuengine.engine import key_columns
from gpuengine.packing import ItemBlock, WorkItem
from gpuengine.scheduler import Scheduler
from gpuengine.store.codec import Packed16


def _items(sizes, keys=1, tag="i"):
    return [WorkItem(f"{tag}{i:015d}".encode()[:16], np.arange(n, dtype=np.int32) + i, n - 2,
                     tuple(f"k{j}{tag}{i:013d}".encode()[:16] for j in range(keys)))
            for i, n in enumerate(sizes)]


def _plain(item: WorkItem) -> tuple:
    return tuple(item)


@pytest.mark.parametrize("keys", [0, 1, 2])
def test_a_block_reads_back_as_its_items(keys):
    items = _items([5, 9, 3, 12, 7], keys)
    block = ItemBlock.of(items)
    assert len(block) == 5 and len(block.keys) == keys
    assert list(map(_plain, block)) == list(map(_plain, items))
    assert all(type(i) is WorkItem for i in block)
    assert [_plain(block[i]) for i in range(-5, 5)] == list(map(_plain, items * 2))
    assert list(map(_plain, block[1:4])) == list(map(_plain, items[1:4]))
    assert block.n_tokens == [5, 9, 3, 12, 7] and block.residues == [3, 7, 1, 10, 5]
    assert ItemBlock.of(block) is block


def test_take_gathers_every_column_in_the_given_order():
    items = _items([5, 9, 3, 12, 7], keys=2)
    block = ItemBlock.of(items)
    for order in ([4, 0, 2], [3], [], [1, 1, 0]):
        taken = block.take(order)
        assert list(map(_plain, taken)) == [_plain(items[i]) for i in order]
        assert len(taken.keys) == 2
    assert list(map(_plain, block)) == list(map(_plain, items))  # the source is unchanged


def test_concat_and_extend_keep_keys_only_when_every_block_has_as_many():
    a, b = _items([4, 5], keys=1, tag="a"), _items([6], keys=1, tag="b")
    joined = ItemBlock.concat([ItemBlock.of(a), ItemBlock.of(b)])
    assert list(map(_plain, joined)) == list(map(_plain, a + b)) and len(joined.keys) == 1
    bare = _items([7], keys=0, tag="c")
    mixed = ItemBlock.concat([ItemBlock.of(a), ItemBlock.of(bare)])
    assert mixed.keys == () and [i.digest for i in mixed] == [i.digest for i in a + bare]
    assert ItemBlock.of(a + bare).keys == ()  # one item without keys: as if none had any
    # extend copies: the block extended from does not change when the other one does
    source = ItemBlock.of(b)
    target = ItemBlock([], [], [], [], ())
    target.extend(source)
    target.extend(ItemBlock.of(a))
    assert len(source) == 1 and len(source.keys[0]) == 1
    target.drop_front(1)
    assert list(map(_plain, target)) == list(map(_plain, a))


def test_key_columns_of_a_block_pack_each_outputs_keys():
    items = _items([4, 5, 6], keys=2)
    columns = key_columns(ItemBlock.of(items))
    assert all(type(c) is Packed16 for c in columns)
    assert [list(c) for c in columns] == [[i.keys[j] for i in items] for j in range(2)]
    assert key_columns(ItemBlock.of(_items([4], keys=0))) == ()
    assert key_columns(ItemBlock([], [], [], [], ())) == ()
    bad = ItemBlock.of(items)
    bad.keys[0][1] = b"short"
    with pytest.raises(Exception, match="16 bytes"):
        key_columns(bad)


def test_scheduled_blocks_are_their_items_and_stay_so_after_the_queue_moves_on():
    """Batches cut from the ready queue's block are blocks of their own: compacting the
    queue (after 4096 items are taken) and later submissions leave them as they were."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(3, 60, 12_000).tolist()
    items = _items(sizes, keys=1)
    s = Scheduler(window=1000, max_queued=1 << 40)  # all submitted before any is taken
    for start in range(0, len(items), 700):
        s.submit(ItemBlock.of(items[start:start + 700]),
                 np.asarray(sizes[start:start + 700], np.int64))
    s.close()
    batches, expected = [], {}
    while (batch := s.next_batch(0, 2000)) is not None:
        assert list(map(_plain, batch.block)) == list(map(_plain, batch.items))
        assert batch.n_tokens == sum(i.n_tokens for i in batch.items) <= 2000
        assert batch.max_len == max(i.n_tokens for i in batch.items)
        expected[batch.batch_id] = list(map(_plain, batch.block))
        batches.append(batch)
        s.complete(batch.batch_id)
    for batch in batches:  # nothing a later cut or compaction did reached an earlier batch
        assert list(map(_plain, batch.block)) == expected[batch.batch_id]
    digests = [d for b in batches for d in b.block.digests]
    assert sorted(digests) == sorted(i.digest for i in items)  # each once
    # each window of 1000 (the intake) is handed out sorted by length
    lengths = [n for b in batches for n in b.block.n_tokens]
    assert lengths[:1000] == sorted(lengths[:1000])


def test_an_out_of_memory_split_and_a_failure_give_back_work_items():
    items = _items([10, 10, 10, 10], keys=1)
    s = Scheduler()
    s.submit(items)
    s.close()
    batch = s.next_batch(0, 1000)
    assert s.out_of_memory(batch.batch_id) == ()
    halves = [s.next_batch(0, 1000), s.next_batch(0, 1000)]
    assert [len(h.block) for h in halves] == [2, 2] and all(h.attempt == 1 for h in halves)
    assert [_plain(i) for h in halves for i in h.items] == list(map(_plain, items))
    given = s.fail(halves[0].batch_id)
    assert type(given) is tuple and list(map(_plain, given)) == list(map(_plain, items[:2]))
