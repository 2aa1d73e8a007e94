"""``gpuengine merge``: shards merged into one store hold exactly what one process writing every
record holds (byte for byte), into a new or an existing store; tables that differ and ids that
name two sequences are refused before anything is written; duplicates merge once; run records
are carried; a merge interrupted (a stop, an exception, SIGKILL of a real process) and rerun
ends with the same bytes; ``--verify`` finds a vector or id tampered with behind its back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

import gpuengine
from gpuengine.errors import StoreMismatchError, UsageError
from gpuengine.store import EmbeddingStore
from gpuengine.store import merge as merge_module
from gpuengine.store import merge_plan
from gpuengine.store.merge import merge_run_id, merge_stores
from gpuengine.store.schema import OutputSpec, emb_db_name, ids_db_name
from held_process import held_command, held_env
from store_shards import (MEAN, StopAfter, dump, make_spec, records, run_records, shard_of,
                          write_shards, write_store)

ROOT = Path(gpuengine.__file__).resolve().parent.parent
SPEC = make_spec()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """400 records (aliases, long ids) as one store and as 4 shards."""
    base = tmp_path_factory.mktemp("merge")
    recs = records(400)
    single = write_store(base / "single.lmdb", SPEC, recs)
    shards = write_shards(base / "shards", SPEC, recs, 4)
    return {"base": base, "recs": recs, "single": single, "shards": shards}


@pytest.mark.parametrize("read_ahead", [False, True])
def test_merge_of_shards_equals_one_store(data, tmp_path, read_ahead):
    out = tmp_path / "all.lmdb"
    threads = threading.active_count()
    summary = merge_stores(out, data["shards"], transaction_bytes=4096, read_ahead=read_ahead)
    assert threading.active_count() == threads  # the reading thread is joined
    assert dump(out) == dump(data["single"])  # every key and value, byte for byte
    assert summary.transactions > 4  # small transactions: many resume points
    counts = summary.tables["default"]
    assert counts["emb_added"] == len(dump(data["single"])["emb"])
    assert counts["ids_added"] == len(data["recs"]) and counts["emb_duplicates"] == 0
    record = run_records(out)[summary.run_id]
    assert record["committed_sequences"] == counts["emb_added"] // 2  # mean and per-token
    assert record["committed_records"] == len(data["recs"])
    with EmbeddingStore(out) as merged, EmbeddingStore(data["single"]) as single:
        assert list(merged.items())[5][0] == list(single.items())[5][0]
        assert merged.spec == single.spec and len(merged) == len(single)


def test_a_directory_of_shards_is_expanded_in_name_order(data, tmp_path):
    out = tmp_path / "all.lmdb"
    summary = merge_stores(out, [data["base"] / "shards"])
    assert summary.stores == [str(p) for p in data["shards"]]
    assert dump(out) == dump(data["single"])


def test_merge_into_an_existing_store(data, tmp_path):
    recs = data["recs"]
    out = write_store(tmp_path / "all.lmdb", SPEC, [r for r in recs if shard_of(r[1], 4) == 0])
    summary = merge_stores(out, data["shards"][1:], transaction_bytes=4096)
    assert dump(out) == dump(data["single"])
    assert summary.tables["default"]["emb_duplicates"] == 0
    again = merge_stores(out, data["shards"])  # shard 0 is in OUT already: all duplicates
    assert dump(out) == dump(data["single"])
    counts = again.tables["default"]
    assert counts["emb_added"] == 0 and counts["ids_added"] == 0
    assert counts["ids_duplicates"] == len(recs) and counts["emb_differing"] == 0


def test_duplicates_merge_once(tmp_path):
    recs = records(60)
    a = write_store(tmp_path / "a.lmdb", SPEC, recs[:40])
    b = write_store(tmp_path / "b.lmdb", SPEC, recs[20:])  # 20 records in both
    single = write_store(tmp_path / "single.lmdb", SPEC, recs)
    summary = merge_stores(tmp_path / "out.lmdb", [a, b], verify=True)
    assert dump(tmp_path / "out.lmdb") == dump(single)
    assert summary.tables["default"]["ids_duplicates"] == 20
    assert summary.verify.ok and summary.verify.identical == summary.verify.vectors


@pytest.mark.parametrize("change, words", [
    ({"sha256": "cd" * 32}, ["model weights sha256 differ", "abababab", "cdcdcdcd"]),
    ({"outputs": (MEAN,)}, ["outputs differ", "layer6/per-token"]),
    ({"store_dtype": "float32"}, ["store dtype differs", "float16", "float32"]),
    ({"max_residues": 500}, ["max_residues (truncation) differs", "1022", "500"]),
    ({"precision": "fp16"}, ["compute precision differs", "fp32", "fp16"]),
    ({"dim": 16}, ["dim differs", "model embed_dim differs"]),
])
def test_tables_that_differ_are_refused_field_by_field(tmp_path, change, words):
    recs = records(10)
    a = write_store(tmp_path / "a.lmdb", SPEC, recs)
    b = write_store(tmp_path / "b.lmdb", make_spec(**change), records(10, seed=1, prefix="b"))
    out = tmp_path / "out.lmdb"
    with pytest.raises(StoreMismatchError) as err:
        merge_stores(out, [a, b])
    message = str(err.value)
    for word in words + [str(a), str(b), "table 'default'"]:
        assert word in message, message
    assert not out.exists()  # nothing written


def test_a_table_in_some_stores_only_and_named_tables(tmp_path):
    small = make_spec(name="small", outputs=(OutputSpec(3, "mean"),), sha256="12" * 32)
    a = write_store(tmp_path / "a.lmdb", SPEC, records(30))
    b = write_store(tmp_path / "b.lmdb", small, records(30, seed=2))
    write_store(b, SPEC, records(30, seed=3, prefix="b"))
    out = tmp_path / "out.lmdb"
    merge_stores(out, [a, b], verify=True)
    with EmbeddingStore(out, table="small") as s:
        assert s.spec == small and len(s) == len(records(30, seed=2))
    with EmbeddingStore(out) as d:
        assert len(d) == len(records(30)) + len(records(30, seed=3, prefix="b"))


def test_old_tables_without_precision(tmp_path):
    old = write_store(tmp_path / "old.lmdb", make_spec(precision=None), records(10))
    new = write_store(tmp_path / "new.lmdb", make_spec(precision="fp16"),
                      records(10, seed=1, prefix="n"))
    merge_stores(tmp_path / "out.lmdb", [old, new])  # nothing shows what old holds: accepted
    with EmbeddingStore(tmp_path / "out.lmdb") as store:
        assert store.spec.precision == "fp16"  # recorded where a store records it
    shown = write_store(tmp_path / "shown.lmdb", make_spec(precision=None),
                        records(10, seed=2, prefix="s"),
                        run={"command": "embed", "precision": "fp32"})
    with pytest.raises(StoreMismatchError, match="fp32 by its run records"):
        merge_stores(tmp_path / "out2.lmdb", [new, shown])
    merge_stores(tmp_path / "out3.lmdb", [old, shown])  # two old tables: stays unrecorded
    with EmbeddingStore(tmp_path / "out3.lmdb") as store:
        assert store.spec.precision is None


def test_same_id_other_sequence_is_refused_and_named(tmp_path):
    a = write_store(tmp_path / "a.lmdb", SPEC, [("P1", "MKV"), ("P2", "MKW")])
    b = write_store(tmp_path / "b.lmdb", SPEC, [("P0", "AAA"), ("P2", "MKY")])
    out = tmp_path / "out.lmdb"
    with pytest.raises(StoreMismatchError) as err:
        merge_stores(out, [a, b])
    assert "'P2'" in str(err.value) and str(a) in str(err.value) and str(b) in str(err.value)
    assert not out.exists()
    existing = write_store(tmp_path / "existing.lmdb", SPEC, [("P2", "MKV")])
    before = dump(existing)
    with pytest.raises(StoreMismatchError, match="'P2'.*existing.lmdb \\(the output\\)"):
        merge_stores(existing, [b])
    assert dump(existing) == before and len(run_records(existing)) == 0


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_conflict_found_while_writing_stops_before_its_transaction(tmp_path, monkeypatch,
                                                                     read_ahead):
    """An id OUT maps to another sequence that the check before writing did not see (as if
    another writer added it meanwhile): the merge stops in the transaction that meets it,
    and what it committed before is a consistent store."""
    monkeypatch.setattr(merge_plan, "_check_ids", lambda *args: None)
    a = write_store(tmp_path / "a.lmdb", SPEC, records(30))
    b = write_store(tmp_path / "b.lmdb", SPEC, [(records(30)[25][0], "MKVWWW")])
    out = tmp_path / "out.lmdb"
    threads = threading.active_count()
    with pytest.raises(StoreMismatchError, match=repr(records(30)[25][0])):
        merge_stores(out, [a, b], transaction_bytes=256, read_ahead=read_ahead)
    assert threading.active_count() == threads
    assert run_records(out)[merge_run_id([str(a), str(b)])]["status"] == "failed"
    with EmbeddingStore(out) as store:
        assert 0 < len(store) < len(records(30))
        assert all(store[rid] is not None for rid in store.ids())  # every id has its vector


def test_run_records_are_carried(data, tmp_path):
    out = tmp_path / "all.lmdb"
    summary = merge_stores(out, data["shards"])
    runs = run_records(out)
    record = runs[summary.run_id]
    assert record["status"] == "complete" and record["info"]["command"] == "merge"
    stores = record["info"]["stores"]
    assert [s["path"] for s in stores] == [str(p) for p in data["shards"]]
    assert [s["shards"] for s in stores] == [[f"{i}/4"] for i in range(4)]
    assert stores[0]["runs"][0]["inputs"] == ["in.fa"] and stores[0]["fingerprint"]["tables"]
    carried = {k: v for k, v in runs.items() if k != summary.run_id}
    assert len(carried) == summary.runs_carried == 4
    assert {v["merged_from"]["run_id"] for v in carried.values()} == {f"run-{i}" for i in range(4)}
    assert all(k.startswith("run-") and "@" in k for k in carried)  # cannot collide
    assert sum(v["committed_records"] for v in carried.values()) == len(data["recs"])


def test_rerun_after_completion_does_nothing(data, tmp_path):
    out = tmp_path / "all.lmdb"
    merge_stores(out, data["shards"])
    before = dump(out)
    again = merge_stores(out, data["shards"], verify=True)
    assert again.already_complete and again.transactions == 0 and again.verify.ok
    assert dump(out) == before


def tamper(path: Path, table: str, kind: str, how: str) -> bytes:
    """Change one entry of OUT behind gpuengine's back (a raw LMDB write); returns its key."""
    env = lmdb.open(str(path), max_dbs=64)
    try:
        db = env.open_db((emb_db_name(table) if kind == "emb" else ids_db_name(table)).encode())
        with env.begin(write=True) as txn:
            cursor = txn.cursor(db=db)
            cursor.first()
            cursor.next()
            key, value = cursor.key(), cursor.value()
            if how == "flip":
                txn.put(key, bytes([value[0] ^ 1]) + value[1:], db=db)
            else:
                txn.delete(key, db=db)
        return key
    finally:
        env.close()


@pytest.mark.parametrize("kind, how, field", [("emb", "flip", "kept_existing"),
                                              ("emb", "delete", "missing_vectors"),
                                              ("ids", "flip", "differing_ids"),
                                              ("ids", "delete", "missing_ids")])
def test_verify_finds_a_tampered_output(data, tmp_path, kind, how, field):
    out = tmp_path / "all.lmdb"
    assert merge_stores(out, data["shards"], verify=True).verify.ok
    key = tamper(out, "default", kind, how)
    result = merge_stores(out, data["shards"], verify=True).verify
    assert not result.ok and getattr(result, field) == 1 and result.differences == 1
    assert result.examples and str(out) in result.examples[0]
    if kind == "emb":
        assert key.hex() in result.examples[0]


def test_differing_copies_of_one_sequence_keep_the_first(tmp_path):
    a = write_store(tmp_path / "a.lmdb", SPEC, records(20))
    b = write_store(tmp_path / "b.lmdb", SPEC, records(20))
    tamper(b, "default", "emb", "flip")  # b holds one vector with other bytes (as from a GPU)
    summary = merge_stores(tmp_path / "out.lmdb", [a, b], verify=True)
    assert summary.tables["default"]["emb_differing"] == 1
    assert summary.verify.ok and summary.verify.kept_other == 1
    assert dump(tmp_path / "out.lmdb") == dump(a)
    out = write_store(tmp_path / "out2.lmdb", SPEC, records(20))
    tamper(out, "default", "emb", "flip")  # OUT's own copy differs: it is kept and counted
    summary = merge_stores(out, [a], verify=True)
    assert summary.tables["default"]["emb_differing_existing"] == 1
    assert summary.verify.ok and summary.verify.kept_existing == 1


@pytest.mark.parametrize("what", ["vectors", "ids"])
def test_a_stopped_merge_resumes_to_the_same_bytes(data, tmp_path, what):
    out = tmp_path / "all.lmdb"
    stop = threading.Event()
    first = merge_stores(out, data["shards"], transaction_bytes=2048, stop=stop,
                         progress=StopAfter(stop, what, 3))
    assert first.interrupted and first.exit_code == 130
    record = run_records(out)[first.run_id]
    assert record["status"] == "interrupted"
    assert record["progress"]["default"]["emb" if what == "vectors" else "ids"]["after"]
    second = merge_stores(out, data["shards"], transaction_bytes=2048)
    assert second.resumed and not second.interrupted
    assert dump(out) == dump(data["single"])
    record = run_records(out)[first.run_id]
    assert record["status"] == "complete" and record["resumes"] == 1


@pytest.mark.parametrize("what", ["checking ids", "verifying"])
def test_a_stop_during_the_id_check_or_the_verify(data, tmp_path, what):
    out = tmp_path / "all.lmdb"
    stop = threading.Event()
    summary = merge_stores(out, data["shards"], verify=True, stop=stop,
                           progress=StopAfter(stop, what, 1))
    assert summary.interrupted and summary.exit_code == 130
    if what == "checking ids":
        assert not out.exists()  # nothing written before the check is done
    else:
        assert summary.verify is None and dump(out) == dump(data["single"])


def test_a_crash_inside_a_transaction_loses_only_that_one(data, tmp_path, monkeypatch):
    out = tmp_path / "all.lmdb"
    calls = {"n": 0}
    real = merge_module._put_sorted

    def failing(cursor, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            real(cursor, chunk)  # written, then the transaction dies before its commit
            raise OSError("disk on fire")
        return real(cursor, chunk)

    monkeypatch.setattr(merge_module, "_put_sorted", failing)
    with pytest.raises(OSError):
        merge_stores(out, data["shards"], transaction_bytes=2048)
    monkeypatch.setattr(merge_module, "_put_sorted", real)
    assert run_records(out)[merge_run_id([str(p) for p in data["shards"]])]["status"] == "failed"
    merge_stores(out, data["shards"], transaction_bytes=2048)
    assert dump(out) == dump(data["single"])


def test_an_input_that_changed_since_the_interruption_starts_over(tmp_path):
    recs = records(200)
    a = write_store(tmp_path / "a.lmdb", SPEC, recs[:100])
    b = write_store(tmp_path / "b.lmdb", SPEC, recs[100:150])
    out = tmp_path / "out.lmdb"
    stop = threading.Event()
    merge_stores(out, [a, b], transaction_bytes=2048, stop=stop,
                 progress=StopAfter(stop, "vectors", 2))
    write_store(b, SPEC, recs[150:])  # the shard was resumed meanwhile: keys below the mark
    summary = merge_stores(out, [a, b], verify=True)
    assert summary.restarted and summary.verify.ok
    assert dump(out) == dump(write_store(tmp_path / "single.lmdb", SPEC, recs))


def test_an_output_killed_before_its_first_commit_is_taken_as_new(data, tmp_path):
    out = tmp_path / "all.lmdb"
    lmdb.open(str(out), max_dbs=64).close()  # data.mdb, nothing committed
    merge_stores(out, data["shards"])
    assert dump(out) == dump(data["single"])


def test_usage_errors(data, tmp_path):
    with pytest.raises(UsageError, match="also an input"):
        merge_stores(data["shards"][0], data["shards"])
    with pytest.raises(UsageError, match="named twice"):
        merge_stores(tmp_path / "o.lmdb", [data["shards"][0], data["shards"][0]])
    with pytest.raises(UsageError, match="no store given"):
        merge_stores(tmp_path / "o.lmdb", [])


# -- the command, as a real process -----------------------------------------------------------


def cli(*args: str, held: bool = False, **kwargs) -> subprocess.Popen:
    """``gpuengine ARGS`` in a process; ``held``: a merge waits for its stop after its first
    chunks of vectors (held_process.py), for a test that kills it mid-merge."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "gpuengine", *map(str, args)]
    if held:
        cmd, env = held_command(*args), held_env(env)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = cli(*args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def merge_progress(out: Path, run_id: str) -> dict | None:
    """The merge record as another process sees it (None before the first commit)."""
    if not (out / "data.mdb").exists():
        return None
    env = lmdb.open(str(out), max_dbs=64, readonly=True)
    try:
        runs = env.open_db(b"runs", create=False)
        with env.begin() as txn:
            raw = txn.get(run_id.encode(), db=runs)
        return None if raw is None else json.loads(raw)
    except lmdb.Error:
        return None
    finally:
        env.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """Shards large enough that a merge with tiny transactions takes a few seconds."""
    base = tmp_path_factory.mktemp("big")
    spec = make_spec(outputs=(MEAN,), dim=512)
    recs = records(4000, seed=5)
    shards = write_shards(base / "shards", spec, recs, 4)
    return {"base": base, "shards": shards, "reference": base / "reference.lmdb",
            "ref_summary": merge_stores(base / "reference.lmdb", shards)}


@pytest.mark.slow
def test_kill_9_mid_merge_then_rerun_gives_the_same_bytes(big, tmp_path):
    out = tmp_path / "all.lmdb"
    run_id = merge_run_id([str(p) for p in big["shards"]])
    proc = cli("merge", out, *big["shards"], "--transaction-mb", "0.02", "-q", held=True)
    state = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        record = merge_progress(out, run_id)
        state = record and record["progress"]["default"]["emb"]
        if state and state["after"] and state["added"] > 0:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the held merge ended before it was killed:\n{proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed = merge_progress(out, run_id)
    assert killed["status"] == "running"
    marker = json.loads((out / "merge-unsynced.json").read_text())  # killed mid-deferred
    assert marker["state"] == "unsynced" and marker["pid"] == proc.pid
    assert 0 < killed["progress"]["default"]["emb"]["added"] < len(dump(big["reference"])["emb"])
    code, stdout, err = run_cli("merge", out, *big["shards"], "--transaction-mb", "0.02",
                                "--json", "-q")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["resumed"] and summary["vectors_read"] < sum(
        c["emb_added"] for c in big["ref_summary"].tables.values())
    assert dump(out) == dump(big["reference"])
    record = merge_progress(out, run_id)
    assert record["status"] == "complete" and record["resumes"] == 1
    assert record["committed_sequences"] == len(dump(big["reference"])["emb"])


def test_cli_merge_json_and_verify(data, tmp_path):
    out = tmp_path / "all.lmdb"
    code, stdout, err = run_cli("merge", out, data["base"] / "shards", "--verify", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["verify"]["ok"]
    assert summary["tables"]["default"]["ids_added"] == len(data["recs"])
    assert "gpuengine merge: summary" in err and "Traceback" not in err
    tamper(out, "default", "emb", "flip")
    code, stdout, err = run_cli("merge", out, data["base"] / "shards", "--verify", "-q")
    assert code == 1 and stdout == "" and "Traceback" not in err


@pytest.mark.parametrize("case, code, words", [  # real processes: one in the fast lane
    pytest.param("mismatch", 1, ["model weights sha256 differ"], marks=pytest.mark.slow),
    ("conflict", 1, ["'P2'", "names different sequences"]),
    pytest.param("missing", 1, ["no store at"], marks=pytest.mark.slow),
    pytest.param("out-is-input", 2, ["also an input"], marks=pytest.mark.slow),
    pytest.param("bad-size", 2, ["--transaction-mb"], marks=pytest.mark.slow),
])
def test_cli_merge_user_errors(tmp_path, case, code, words):
    a = write_store(tmp_path / "a.lmdb", SPEC, [("P1", "MKV"), ("P2", "MKW")])
    b = write_store(tmp_path / "b.lmdb", make_spec(sha256="cd" * 32) if case == "mismatch"
                    else SPEC, [("P2", "MKY")])
    args = {"mismatch": [a, b], "conflict": [a, b], "missing": [a, tmp_path / "nope.lmdb"],
            "out-is-input": [a, tmp_path / "out.lmdb"],
            "bad-size": [a, "--transaction-mb", "0"]}[case]
    if case == "out-is-input":
        write_store(tmp_path / "out.lmdb", SPEC, [("P9", "MKV")])
    got, stdout, err = run_cli("merge", tmp_path / "out.lmdb", *args)
    assert got == code and stdout == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any(
        line.startswith("error") for line in lines[:-1]), err  # the error is one line
    for word in words:
        assert word in err, err
    if case != "out-is-input":
        assert not (tmp_path / "out.lmdb").exists()


@pytest.mark.slow
def test_shards_embedded_by_the_engine_merge_into_what_one_run_writes(tiny_pt, tmp_path):
    """The real engine (tiny random ESM-2, CPU, fp32) embeds the records in one run, and as
    3 shards split by sequence digest; the merged shards hold the same ids and vectors."""
    from conftest import random_proteins

    import gpuengine as api

    seqs = random_proteins([5 + (i * 7) % 40 for i in range(60)], seed=4)
    recs = [(f"p{i}", s) for i, s in enumerate(seqs)] + [("dup", seqs[3])]
    api.embed(recs, model=str(tiny_pt), store=tmp_path / "single.lmdb", devices="cpu")
    for index in range(3):
        part = [(rid, seq) for rid, seq in recs if shard_of(seq, 3) == index]
        api.embed(part, model=str(tiny_pt), store=tmp_path / f"shard{index}.lmdb",
                  devices="cpu")
    summary = merge_stores(tmp_path / "merged.lmdb",
                           [tmp_path / f"shard{i}.lmdb" for i in range(3)], verify=True)
    assert summary.verify.ok and summary.runs_carried == 3
    with EmbeddingStore(tmp_path / "merged.lmdb") as merged, \
            EmbeddingStore(tmp_path / "single.lmdb") as single:
        assert merged.spec == single.spec and merged.spec.precision == "fp32"
        assert list(merged.ids()) == list(single.ids())
        for (a, x), (b, y) in zip(merged.items(), single.items(), strict=True):
            assert a == b
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
