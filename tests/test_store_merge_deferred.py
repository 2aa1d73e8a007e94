"""Deferred flushing of a merge into a new store (gpuengine/store/deferred.py): the marker with
the boot id is on disk before the first unflushed commit, everything is flushed before the
merge is recorded complete, a store with data of its own is flushed at every commit, a rerun
on the same boot resumes, and an output left unflushed by an earlier boot (an OS crash) is
emptied and merged again instead of being trusted. (A kill -9 during the unflushed pass, then
a rerun: test_store_merge.py::test_kill_9_mid_merge_then_rerun_gives_the_same_bytes.)"""

from __future__ import annotations

import json
import logging
import threading

import pytest

from gpuengine.store import deferred
from gpuengine.store import merge as merge_module
from gpuengine.store.environment import StoreEnv
from gpuengine.store.merge import merge_stores
from store_shards import (StopAfter, dump, make_spec, records, run_records, write_shards,
                          write_store)

SPEC = make_spec()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("deferred")
    recs = records(300, seed=3)
    return {"recs": recs, "single": write_store(base / "single.lmdb", SPEC, recs),
            "shards": write_shards(base / "shards", SPEC, recs, 3)}


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """What happened, in order: flushes of the output, the marker's states, the commit of
    the complete record (with the marker's state at that moment)."""
    seen: list[str] = []
    real_sync, real_finish, real_write = StoreEnv.sync, merge_module._Merge._finish, \
        deferred.write_marker

    def sync(self):
        real_sync(self)
        seen.append("flush")

    def finish(self, txn):
        marker = deferred.read_marker(self.plan.out)
        seen.append(f"complete (marker {marker and marker['state']})")
        return real_finish(self, txn)

    def write_marker(store, state):
        real_write(store, state)
        seen.append(f"marker {state}")

    monkeypatch.setattr(StoreEnv, "sync", sync)
    monkeypatch.setattr(merge_module._Merge, "_finish", finish)
    monkeypatch.setattr(merge_module, "write_marker", write_marker)
    return seen


def test_a_new_output_is_flushed_before_the_merge_is_recorded_complete(data, tmp_path, events):
    out = tmp_path / "all.lmdb"
    summary = merge_stores(out, data["shards"], transaction_bytes=2048)
    assert dump(out) == dump(data["single"])
    assert summary.transactions > 5
    assert events[0] == "marker unsynced" and "flush" in events
    complete = events.index("complete (marker synced)")
    assert events[complete - 2:complete] == ["flush", "marker synced"]
    assert not (out / deferred.MARKER).exists()  # an ordinary store again
    assert run_records(out)[summary.run_id]["status"] == "complete"


def test_a_store_with_data_of_its_own_is_flushed_at_every_commit(data, tmp_path, events):
    out = write_store(tmp_path / "mine.lmdb", SPEC, records(30, seed=9, prefix="mine-"))
    summary = merge_stores(out, data["shards"], transaction_bytes=2048)
    assert summary.tables["default"]["ids_added"] == len(data["recs"])
    assert events == ["complete (marker None)"]  # no marker, no deferred flushes
    assert not (out / deferred.MARKER).exists()


def interrupted(out, shards) -> str:
    stop = threading.Event()
    first = merge_stores(out, shards, transaction_bytes=2048, stop=stop,
                         progress=StopAfter(stop, "vectors", 3))
    assert first.interrupted
    assert deferred.read_marker(out)["state"] == "synced"  # flushed before returning
    return first.run_id


def test_an_unflushed_output_of_this_boot_is_resumed(data, tmp_path):
    out = tmp_path / "all.lmdb"
    run_id = interrupted(out, data["shards"])
    (out / deferred.MARKER).write_text(json.dumps(  # as a kill -9 leaves it
        {"state": "unsynced", "boot_id": deferred.boot_id()}))
    second = merge_stores(out, data["shards"], transaction_bytes=2048)
    assert second.resumed and dump(out) == dump(data["single"])
    assert run_records(out)[run_id]["resumes"] == 1


def test_an_unflushed_output_of_another_boot_is_merged_again(data, tmp_path, caplog):
    out = tmp_path / "all.lmdb"
    run_id = interrupted(out, data["shards"])
    (out / deferred.MARKER).write_text(json.dumps(  # an OS crash came before the flush
        {"state": "unsynced", "boot_id": "an-earlier-boot"}))
    with open(out / "data.mdb", "r+b") as f:  # and the disk kept half of it
        f.write(bytes(8192))
    with caplog.at_level(logging.WARNING, logger="gpuengine.store.deferred"):
        second = merge_stores(out, data["shards"], transaction_bytes=2048, verify=True)
    assert "may be damaged" in caplog.text and "an-earlier-boot" in caplog.text
    assert not second.resumed and second.verify.ok
    assert dump(out) == dump(data["single"])
    record = run_records(out)[run_id]
    assert record["status"] == "complete" and record["resumes"] == 0
    assert not (out / deferred.MARKER).exists()


def test_a_marker_says_whether_the_store_may_be_damaged(monkeypatch):
    assert not deferred.may_be_damaged(None)
    assert not deferred.may_be_damaged({"state": "synced", "boot_id": "other"})
    assert not deferred.may_be_damaged({"state": "unsynced", "boot_id": deferred.boot_id()})
    assert deferred.may_be_damaged({"state": "unsynced", "boot_id": "other"})
    assert deferred.may_be_damaged({"state": "unsynced"})
    monkeypatch.setattr(deferred, "BOOT_ID", deferred.BOOT_ID.parent / "no-such-file")
    assert deferred.boot_id() is None  # no boot id: an unsynced store is never trusted
    assert deferred.may_be_damaged({"state": "unsynced", "boot_id": None})
