"""A user error never prints a traceback: every command, run as a real process
(``python -m gpuengine …``; the fast commands also in process, see below), pointed at what users point it at by mistake — a store with several
tables and none named ``default`` (every ``predict`` store), a missing path, an empty
directory, a file that is not a store, a directory whose data.mdb is not LMDB, an LMDB that is
not a gpuengine store, broken status files — and given bad options. Each run must exit with
its documented code (gpuengine/errors.py: 0 ok, 1 error, 2 usage), print no "Traceback" and,
when it fails, say why on stderr and print nothing on stdout.

The runs of a group go concurrently in one module fixture (each its own process); the commands
that import torch and load the tiny model are marked slow. The fast commands also run in
process (typer's CliRunner in this test's process, with the same environment, working
directory and terminal width; an exception that escapes the CLI fails the case with its
traceback): that copy is the fast lane's, the real processes are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gpuengine
from conftest import random_proteins, write_fasta
from gpuengine.store import CommitEntry, ModelIdentity, OutputSpec, StoreWriter, TableSpec
from gpuengine.store.codec import sequence_digest

ROOT = Path(gpuengine.__file__).resolve().parent.parent
TARGETS = ("missing", "empty", "file", "garbage", "lmdb")
"""Paths that are not stores (see the ``paths`` fixture)."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_pt, predict_models) -> dict[str, str]:
    """Everything the cases point at, made once."""
    base = tmp_path_factory.mktemp("user-errors")
    multi = base / "predict.lmdb"
    with StoreWriter(multi) as writer:  # the tables of a predict store, models unlike tiny_pt's
        for name, dim in (("dnabert", 12), ("esm", 8)):
            model = ModelIdentity(family="esm2", name=f"other_{name}", sha256="ef" * 32,
                                  num_layers=2, embed_dim=dim, attention_heads=2, vocab_size=33)
            spec = TableSpec(name=name, model=model, outputs=(OutputSpec(2, "mean"),),
                             store_dtype="float32", dim=dim, max_residues=None)
            writer.open_table(spec)
            writer.commit(name, [CommitEntry(sequence_digest(f"{name}{i}"), (f"r{i}",),
                                             {spec.outputs[0]: np.ones(dim, np.float32) * i})
                                 for i in range(3)])
    (base / "empty").mkdir()
    (base / "file.txt").write_text("hello\n")
    (base / "garbage").mkdir()
    (base / "garbage" / "data.mdb").write_bytes(os.urandom(8192))
    import lmdb

    with lmdb.open(str(base / "plain.lmdb")) as env, env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    for name, text in (("status-list", "[1, 2]"), ("status-bad", '{"heartbeat_unix": "soon"}'),
                       ("status-junk", "\x00\x01 not json")):
        (base / name).mkdir()
        (base / name / "status.json").write_text(text)
    proteins = write_fasta(base / "p.fa", [("p1", s) for s in random_proteins([12], seed=1)])
    reads = write_fasta(base / "reads.fa", [("read1", "ACGT" * 40)])
    return {"multi": str(multi), "missing": str(base / "missing.lmdb"),
            "empty": str(base / "empty"),
            "file": str(base / "file.txt"), "garbage": str(base / "garbage"),
            "lmdb": str(base / "plain.lmdb"), "tiny": str(tiny_pt), "fasta": str(proteins),
            "reads": str(reads), "new": str(base / "new"), "base": str(base),
            "dna": str(predict_models.dna), "mlp": str(predict_models.mlp_path)}


def run_cli(args: list[str], base: str) -> tuple[int, str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path,
           "GPUENGINE_OFFLINE": "1", "GPUENGINE_CACHE": os.path.join(base, "cache"),
           "TORCH_HOME": os.path.join(base, "torch"), "HF_HOME": os.path.join(base, "hf"),
           "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "gpuengine", *args], capture_output=True,
                            text=True, env=env, cwd=base, timeout=300, stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout, result.stderr


def run_all(cases: dict[str, tuple[str, int]], paths: dict[str, str]) -> dict[str, tuple]:
    """Run every case (concurrently); {case: (code, stdout, stderr)}."""
    def one(template: str):
        return run_cli([part.format(**paths) for part in template.split()], paths["base"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, template) for name, (template, _) in cases.items()}
        return {name: future.result() for name, future in futures.items()}


def check(name: str, cases: dict, results: dict) -> tuple[str, str]:
    template, wanted = cases[name]
    code, out, err = results[name]
    shown = f"gpuengine {template}\nexit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in out + err, shown
    assert code == wanted, shown
    if wanted != 0:
        assert err.strip(), shown  # says why
        assert out == "", shown  # and prints no data
    return out, err


# ----------------------------------------------------------------------------- fast commands
# (no torch import: the store readers, status, and option errors caught by the parser)

FAST = {
    "info-multi": ("info {multi}", 0),
    "info-multi-json": ("info {multi} --json", 0),
    "info-multi-table": ("info {multi} --table esm", 0),
    "info-multi-no-such-table": ("info {multi} --table nope", 2),
    "lookup-multi": ("lookup {multi} r1", 2),
    "lookup-multi-table": ("lookup {multi} r1 --table esm", 0),
    "lookup-multi-bad-layer": ("lookup {multi} r1 --table esm --layer 7", 2),
    "lookup-multi-bad-pool": ("lookup {multi} r1 --table esm --pool max", 2),
    "lookup-multi-missing-id": ("lookup {multi} nope --table esm", 1),
    "export-multi": ("export {multi} -o {base}/x.npz", 2),
    "export-multi-table-bad-format": ("export {multi} --table esm -f parquet -o {base}/x.pq", 2),
    "export-multi-no-such-table": ("export {multi} --table nope -o {base}/x.npz", 2),
    "export-into-a-file": ("export {multi} --table esm -o {file}/x.npz", 1),
    "export-fair-esm-onto-a-file": ("export {multi} --table esm -f fair-esm -o {file}", 1),
    "status-multi": ("status {multi}", 1),
    "status-list": ("status {base}/status-list", 1),
    "status-bad-heartbeat": ("status {base}/status-bad", 1),
    "status-junk": ("status {base}/status-junk", 1),
    "bad-command": ("frobnicate", 2),
    "info-no-argument": ("info", 2),
    "lookup-no-id": ("lookup {multi}", 2),
    "lookup-layer-not-a-number": ("lookup {multi} r1 --layer one", 2),
    "export-no-output": ("export {multi}", 2),
    "embed-no-arguments": ("embed", 2),
    "embed-no-model": ("embed {fasta} -o {new}", 2),
    "predict-no-arguments": ("predict", 2),
    "serve-no-watch": ("serve --store {new} -m {tiny}", 2),
    "serve-watch-a-file": ("serve --watch {file} --store {new} -m {tiny}", 2),
    "serve-bad-job": ("serve --watch {base}/w1 --store {new} -m {tiny} --job dance", 2),
    "serve-predict-without-length": ("serve --watch {base}/w1 --store {new} --job predict", 2),
    "serve-poll-interval-nan": ("serve --watch {base}/w1 --store {new} -m {tiny} "
                                "--poll-interval nan", 2),
    "serve-settle-nan": ("serve --watch {base}/w1 --store {new} -m {tiny} --settle nan", 2),
    "serve-group-files-zero": ("serve --watch {base}/w1 --store {new} -m {tiny} "
                               "--group-files 0", 2),
    "serve-replicas-zero": ("serve --watch {base}/w1 --store {new} -m {tiny} "
                            "--replicas-per-gpu 0", 2),
    "devices-bad-option": ("devices --frobnicate", 2),
    "status-no-argument": ("status", 2),
    "merge-no-input": ("merge {new}", 2),
    "merge-into-a-file": ("merge {file} {multi}", 1),
    "merge-into-plain-lmdb": ("merge {lmdb} {multi}", 1),
    "merge-into-itself": ("merge {multi} {multi}", 2),
    "merge-bad-transaction-size": ("merge {new} {multi} --transaction-mb -1", 2),
}
for _target in TARGETS:
    FAST[f"info-{_target}"] = (f"info {{{_target}}}", 1)
    FAST[f"lookup-{_target}"] = (f"lookup {{{_target}}} r1", 1)
    FAST[f"export-{_target}"] = (f"export {{{_target}}} -o {{base}}/{_target}.npz", 1)
    FAST[f"status-{_target}"] = (f"status {{{_target}}}", 1)
    FAST[f"merge-{_target}"] = (f"merge {{new}} {{{_target}}}", 1)


def run_all_in_process(cases: dict[str, tuple[str, int]], paths: dict[str, str]) -> dict:
    """Every case through the CLI in this process, one after another, in ``run_cli``'s
    environment; {case: (code, stdout, stderr)}."""
    from cli_runs import cli

    base = paths["base"]
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("GPUENGINE_OFFLINE", "1"), ("COLUMNS", "200"),
                            ("GPUENGINE_CACHE", os.path.join(base, "cache")),
                            ("TORCH_HOME", os.path.join(base, "torch")),
                            ("HF_HOME", os.path.join(base, "hf"))):
            mp.setenv(name, value)
        mp.chdir(base)
        for name, (template, _) in cases.items():
            result = cli(*[part.format(**paths) for part in template.split()])
            results[name] = (result.exit_code, result.stdout, result.stderr)
    return results


@pytest.fixture(scope="module", params=["in-process",
                                        pytest.param("process", marks=pytest.mark.slow)])
def fast(paths, request):
    """The fast commands' results, in process (fast lane) or as real processes (slow)."""
    if request.param == "process":
        return run_all(FAST, paths)
    return run_all_in_process(FAST, paths)


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_command(name, fast):
    check(name, FAST, fast)


def test_multi_table_store_info_describes_every_table(fast):
    out, _ = check("info-multi", FAST, fast)
    assert "dnabert:" in out and "esm:" in out and "other_esm" in out
    out, _ = check("info-multi-table", FAST, fast)
    assert "esm:" in out and "dnabert" not in out


def test_multi_table_export_lists_the_tables_in_one_line(fast):
    _, err = check("export-multi", FAST, fast)
    assert len(err.strip().splitlines()) == 1, err
    assert "dnabert, esm" in err and "--table" in err


# ----------------------------------------------------------------------------- heavy commands
# (embed, predict, serve and devices import torch; some load the tiny model first)

HEAVY = {
    "embed-input-missing": ("embed {missing} -m {tiny} -o {new}", 1),
    "embed-input-directory": ("embed {empty} -m {tiny} -o {new}", 1),
    "embed-input-not-fasta": ("embed {file} -m {tiny} -o {new}", 1),
    "embed-out-a-file": ("embed {fasta} -m {tiny} -o {file} -q", 1),
    "embed-out-under-a-file": ("embed {fasta} -m {tiny} -o {file}/x.lmdb -q", 1),
    "embed-out-garbage": ("embed {fasta} -m {tiny} -o {garbage} -q", 1),
    "embed-out-plain-lmdb": ("embed {fasta} -m {tiny} -o {lmdb} -q", 1),
    "embed-multi-other-model": ("embed {fasta} -m {tiny} -o {multi} --table esm -q", 1),
    "embed-model-missing": ("embed {fasta} -m {missing} -o {new} -q", 1),
    "embed-model-not-a-checkpoint": ("embed {fasta} -m {file} -o {new} -q", 1),
    "embed-model-empty-directory": ("embed {fasta} -m {empty} -o {new} -q", 1),
    "embed-bad-precision": ("embed {fasta} -m {tiny} -o {new} --precision fp64", 2),
    "predict-reads-missing": ("predict {missing} --length 500 --classifier {file}", 1),
    "predict-multi-other-models": ("predict {reads} --length 500 --classifier {mlp} --store "
                                   "{multi} --dnabert-model {dna} --esm-model {tiny} -o "
                                   "{base}/pred1 -q", 1),
    "predict-classifier-not-a-model": ("predict {reads} --length 500 --classifier {file} "
                                       "--dnabert-model {dna} --esm-model {tiny} -o {base}/pred2 "
                                       "-q", 1),
    "predict-out-a-file": ("predict {reads} --length 500 --classifier {mlp} --dnabert-model "
                           "{dna} --esm-model {tiny} -o {file} -q", 1),
    "predict-published-models-offline": ("predict {reads} --length 500 --classifier {mlp} -o "
                                         "{base}/pred3 -q", 1),
    "predict-length-not-a-number": ("predict {reads} five {file}", 2),
    "serve-store-a-file": ("serve --watch {base}/w2 --store {file} -m {tiny} -q", 1),
    "serve-multi-other-model": ("serve --watch {base}/w3 --store {multi} --table esm -m {tiny} "
                                "-q", 1),
    "devices-model-missing": ("devices --model {missing}", 1),
    "devices-model-not-a-checkpoint": ("devices --model {file}", 1),
    "devices-bad-precision": ("devices --model esm2_t6_8M_UR50D --precision fp64", 2),
}


@pytest.fixture(scope="module")
def heavy(paths):
    return run_all(HEAVY, paths)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_command(name, heavy, paths):
    check(name, HEAVY, heavy)
    assert not Path(paths["new"]).exists()  # no failed run leaves a store behind
    assert Path(paths["file"]).read_text() == "hello\n"  # nor touches what it refused


@pytest.mark.slow
@pytest.mark.parametrize("name, words", [
    ("embed-multi-other-model", ["table 'esm'", "--table"]),
    ("embed-out-under-a-file", ["Not a directory"]),
    ("embed-out-plain-lmdb", ["not a gpuengine store"]),
    ("predict-multi-other-models", ["table 'dnabert'", "use another --store"]),
    ("predict-out-a-file", ["cannot create the output folder"]),
    ("predict-classifier-not-a-model", ["classifier"]),
    ("serve-store-a-file", ["not a gpuengine store"]),
    ("serve-multi-other-model", ["table 'esm'", "--table"]),
    ("devices-model-not-a-checkpoint", ["checkpoint"]),
])
def test_heavy_messages_say_what_is_wrong(name, words, heavy):
    _, err = check(name, HEAVY, heavy)
    for word in words:
        assert word in err, err
