"""The store across processes: a reader sees a map grown by another process's writer, and a
writer killed with SIGKILL leaves only whole commit groups behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from gpuengine.store import (
    CommitEntry,
    EmbeddingStore,
    ModelIdentity,
    OutputSpec,
    StoreWriter,
    TableSpec,
    sequence_digest,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN = OutputSpec(6, "mean")
TOKENS = OutputSpec(6, "per-token")
DIM = 64
GROUP = 4  # entries per group, two ids each

COMMON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from gpuengine.store import (CommitEntry, EmbeddingStore, ModelIdentity, OutputSpec,
                                 StoreWriter, TableSpec, sequence_digest)

    def make_spec():
        model = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32,
                              num_layers=6, embed_dim=64, attention_heads=4, vocab_size=33)
        return TableSpec(name="default", model=model,
                         outputs=(OutputSpec(6, "mean"), OutputSpec(6, "per-token")),
                         store_dtype="float32", dim=64, max_residues=None)

    def group(spec, g, residues):
        out = []
        for j in range(4):
            value = float(g * 100 + j)
            vectors = {spec.outputs[0]: np.full(64, value),
                       spec.outputs[1]: np.full((residues, 64), value)}
            ids = (f"g{g}-e{j}-a", f"g{g}-e{j}-b")
            out.append(CommitEntry(sequence_digest(f"SEQ-{g}-{j}"), ids, vectors))
        return out
    """
)


def spawn(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", COMMON + textwrap.dedent(script), *args], cwd=ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def make_spec() -> TableSpec:
    model = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32,
                          num_layers=6, embed_dim=DIM, attention_heads=4, vocab_size=33)
    return TableSpec(name="default", model=model, outputs=(MEAN, TOKENS), store_dtype="float32",
                     dim=DIM, max_residues=None)


def make_group(g: int, residues: int) -> list[CommitEntry]:
    """The same group as the child script's ``group()``."""
    out = []
    for j in range(GROUP):
        value = float(g * 100 + j)
        vectors = {MEAN: np.full(DIM, value), TOKENS: np.full((residues, DIM), value)}
        out.append(CommitEntry(sequence_digest(f"SEQ-{g}-{j}"), (f"g{g}-e{j}-a", f"g{g}-e{j}-b"),
                               vectors))
    return out


READER_SCRIPT = """
    store = EmbeddingStore(sys.argv[1])
    before = store.info()["map_size"]
    print(json.dumps({"ready": len(store), "map_size": before}), flush=True)
    sys.stdin.readline()
    ids = list(store)
    pooled = store.get_many(ids)
    tokens = EmbeddingStore(sys.argv[1], pool="per-token")
    rows = sum(a.shape[0] for _, a in tokens.items())
    print(json.dumps({"ids": len(ids), "sum": float(pooled[:, 0].sum()), "rows": rows,
                      "map_size": store.info()["map_size"]}), flush=True)
"""


def test_reader_in_other_process_survives_map_growth(tmp_path: Path) -> None:
    path = tmp_path / "grow.lmdb"
    spec = make_spec()
    with StoreWriter(path, initial_map_size=64 << 10) as writer:
        writer.open_table(spec)
        writer.commit("default", make_group(0, residues=2))
        child = spawn(READER_SCRIPT, str(path))
        try:
            first = json.loads(child.stdout.readline() or "{}")
            assert first.get("ready") == 2 * GROUP, child.stderr.read()
            for g in range(1, 25):  # about 6 MB
                writer.commit("default", make_group(g, residues=150))
            assert writer.map_growths > 0 and writer.map_size > first["map_size"]
            out, err = child.communicate("go\n", timeout=60)
        finally:
            child.kill()
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ids"] == 25 * 2 * GROUP
    expected = sum(2.0 * (g * 100 + j) for g in range(25) for j in range(GROUP))
    assert result["sum"] == expected
    assert result["rows"] == 2 * GROUP * (2 + 24 * 150)
    assert result["map_size"] > first["map_size"]


CRASH_SCRIPT = """
    path, k = sys.argv[1], int(sys.argv[2])
    spec = make_spec()
    writer = StoreWriter(path, initial_map_size=64 << 10)
    writer.open_table(spec)
    writer.begin_run("crash-run", {"note": "killed on purpose"})
    g = 0
    while True:
        writer.commit("default", group(spec, g, residues=300), run_id="crash-run")
        g += 1
        if g == k:
            print("committed", g, flush=True)
"""


def _committed_groups(path: Path) -> int:
    """Check every group is whole or absent and the present ones are 0..n-1; return n."""
    with EmbeddingStore(path) as pooled, EmbeddingStore(path, pool="per-token") as tokens:
        upto = len(pooled) // (GROUP * 2) + 2
        present = []
        for g in range(upto):
            flags = []
            for entry in make_group(g, residues=1):
                value = float(np.asarray(entry.vectors[MEAN])[0])
                for rid in entry.record_ids:
                    vector = pooled.get(rid)
                    flags.append(vector is not None)
                    if vector is not None:
                        assert (vector == value).all()
                        rows = tokens[rid]
                        assert rows.shape[1] == DIM and (rows == value).all()
            assert all(flags) or not any(flags), f"group {g} is partly committed: {flags}"
            present.append(all(flags))
        n = sum(present)
        assert present == [True] * n + [False] * (upto - n)
        assert len(pooled) == n * GROUP * 2
        assert pooled.info()["tables"]["default"]["embeddings"] == n * GROUP * 2
        return n


def test_sigkill_mid_commit_leaves_whole_groups(tmp_path: Path) -> None:
    path = tmp_path / "crash.lmdb"
    k = 5
    child = spawn(CRASH_SCRIPT, str(path), str(k))
    try:
        line = child.stdout.readline()
        assert line.split() == ["committed", str(k)], child.stderr.read()
        time.sleep(0.15)  # let it write (and grow the map) a while longer
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    n = _committed_groups(path)
    assert n >= k
    with EmbeddingStore(path) as store:
        run = store.runs()["crash-run"]
    assert run["status"] == "running"
    assert run["committed_sequences"] == n * GROUP
    assert run["committed_records"] == n * GROUP * 2

    # the store stays writable: resume the run and add one more group
    with StoreWriter(path) as writer:
        writer.open_table(make_spec())
        resumed = writer.begin_run("crash-run", {})
        assert resumed["committed_sequences"] == n * GROUP
        writer.commit("default", make_group(n, residues=300), run_id="crash-run")
        writer.finish_run("crash-run", "complete", {})
    assert _committed_groups(path) == n + 1


GROWER_SCRIPT = """
    writer = StoreWriter(sys.argv[1], initial_map_size=64 << 10)
    spec = make_spec()
    writer.open_table(spec)
    for g in range(1, 20):
        writer.commit("default", group(spec, g, residues=150))
    print(writer.map_size, flush=True)
"""


def test_writer_adopts_map_grown_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "two-writers.lmdb"
    with StoreWriter(path, initial_map_size=64 << 10) as writer:
        writer.open_table(make_spec())
        writer.commit("default", make_group(0, residues=2))
        child = spawn(GROWER_SCRIPT, str(path))
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        grown = int(out.split()[-1])
        assert grown > writer.map_size == 64 << 10
        writer.commit("default", make_group(20, residues=150))  # MapResizedError -> adopt
        assert writer.map_size >= grown
    assert _committed_groups(path) == 21
