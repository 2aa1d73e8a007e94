"""``gpuengine`` commands run in process through typer's CliRunner, and the standard input.

``cli`` runs any command (stdout and stderr captured apart; an exception the CLI did not turn
into an exit code fails the test with its traceback); ``embed`` and ``fails`` run ``gpuengine
embed`` expecting success or an error exit, ``predict`` runs ``gpuengine predict`` on the tiny
predict models. The standard input is six proteins (ids with a
description, a '|'-id, a non-ASCII id; lengths 5..300) for the tiny ESM-2 (``tiny_pt``);
conftest's ``reference`` fixture holds fair-esm's outputs for it and ``standard_store`` the store
``gpuengine embed`` makes of it. ``snapshot`` is everything a user can read from a store.
"""

from __future__ import annotations

import functools
import json
import traceback
from pathlib import Path

from click.testing import CliRunner
from typer.main import get_command

from conftest import TINY, isolated_cache, random_proteins, write_fasta
from gpuengine import EmbeddingStore
from gpuengine.cli import app

LAST = TINY[0]  # the tiny model's last layer
DIM = TINY[1]

# The standard input: ids with a description, a '|'-id, a non-ASCII id; lengths 5..300.
IDS = ["P1", "sp|Q2|X_HUMAN", "Ä-unicode-id", "P4", "P5", "P6"]
SEQS = random_proteins([5, 17, 40, 64, 120, 300], seed=7)


@functools.cache
def command():
    """gpuengine's click command, built from the typer app once, as ``gpuengine`` builds it
    once per process (typer's CliRunner rebuilds it on every call: 0.1 s each)."""
    return get_command(app)


def cli(*args, env: dict[str, str] | None = None):
    """Invoke the CLI in process (``env``: variables set for the call). An exception the CLI
    did not turn into an exit code fails the test with its traceback (CliRunner would
    otherwise report it as exit code 1)."""
    result = CliRunner().invoke(command(), [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"gpuengine {' '.join(map(str, args))} raised instead of exiting "
                             f"with a code:\n{tb}\nstderr:\n{result.stderr}")
    return result


def embed(inputs, model, out, *extra, code: int = 0):
    """``gpuengine embed ... --json``; returns the JSON summary (exit 0/3/130) or the result."""
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    result = cli("embed", *inputs, "--model", model, "--out", out, "--json", *extra)
    assert result.exit_code == code, (f"exit {result.exit_code}, wanted {code}\n"
                                      f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    if code in (0, 3, 130):
        return json.loads(result.stdout)
    assert result.stdout == "", "an error run must not print data on stdout"
    return result


PREDICT_OUTPUTS = ("prediction_results.txt", "prediction_results_highestscore.csv",
                   "prediction_results_reads.tsv")
"""The three files one ``gpuengine predict`` run writes."""


def predict(reads, models, out, *extra, code: int = 0):
    """``gpuengine predict READS --length 500`` on the tiny predict models (conftest's
    ``predict_models``) into ``out``, on the CPU, ``--json``: the summary (exit 0) or the
    result."""
    esm, dna, _, mlp_path = models
    result = cli("predict", reads, "--length", "500", "--classifier", mlp_path,
                 "--esm-model", esm, "--dnabert-model", dna, "--out", out, "--gpus", "cpu",
                 "--offline", "-q", "--json", *extra)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result


def fails(inputs, model, out, *extra, code: int = 1) -> str:
    """Run embed expecting an error exit; returns stderr."""
    return embed(inputs, model, out, *extra, code=code).stderr


def standard_fasta(path: Path, ids=IDS, seqs=SEQS) -> Path:
    return write_fasta(path, [(f"{rid} some description {i}", s)
                              for i, (rid, s) in enumerate(zip(ids, seqs))])


def embed_standard_input(model: Path, base: Path) -> dict:
    """``gpuengine embed`` of the standard input into ``base/store.lmdb`` with default options
    (its own cache): {'path', 'fasta', 'summary', 'stderr'}."""
    with isolated_cache(base / "cache"):
        fasta = standard_fasta(base / "proteins.fa")
        result = cli("embed", fasta, "-m", model, "-o", base / "store.lmdb", "--json")
    assert result.exit_code == 0, result.stderr
    return {"path": base / "store.lmdb", "fasta": fasta, "summary": json.loads(result.stdout),
            "stderr": result.stderr}


def snapshot(path: Path) -> dict:
    """Everything a user can read from a store: tables with specs and counts, runs, vectors."""
    with EmbeddingStore(path) as store:
        tables = store.info()["tables"]
        runs = store.runs()
    vectors = {}
    for name, table in tables.items():
        for output in table["spec"]["outputs"]:
            with EmbeddingStore(path, table=name, layer=output["layer"],
                                pool=output["pool"]) as view:
                vectors[(name, output["layer"], output["pool"])] = {
                    rid: array.tobytes() for rid, array in view.items()}
    return {"tables": tables, "runs": runs, "vectors": vectors}


def info_outputs(text: str) -> list[list[str]]:
    """The items listed under ``outputs:`` in ``gpuengine info``'s text, as lists of lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "outputs:")
    base = len(lines[start]) - len(lines[start].lstrip())
    items: list[list[str]] = []
    for line in lines[start + 1:]:
        if len(line) - len(line.lstrip()) <= base:
            break
        if line.strip().startswith("- "):
            items.append([line.strip()[2:]])
        else:
            items[-1].append(line.strip())
    return items
