"""``--shard I/N`` on ``embed`` and ``predict`` (no SLURM): the partition is complete, disjoint
and by content (identical sequences together, truncation respected, a read's frames together);
the reading side keeps the shard's records whichever process reads; a shard store is an ordinary
store whose run record names its shard and input; a shard resumes; the merged shards equal one
run; ``predict --score-only`` writes one run's outputs from the merged shards."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import random_proteins, write_fasta
from gpuengine import EmbeddingStore
from gpuengine.errors import UsageError
from gpuengine.fasta import validate
from gpuengine.inputs import open_input, prepare_chunk, validated_fasta
from gpuengine.records import FastaRecord
from gpuengine.shards import Shard, shard_name, shard_of
from gpuengine.store.merge import merge_stores
from gpuengine.tokenization import EsmTokenizer
from cli_runs import PREDICT_OUTPUTS as OUTPUTS
from cli_runs import cli, embed
from cli_runs import predict as _predict
from virnucpro_files import reads_fasta

ALPHABET = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
MAX = 30  # truncation used below


def _records():
    """Ids with short and long sequences: repeats under other ids, and pairs that differ only
    after residue MAX (the same sequence once truncated)."""
    seqs = random_proteins([5 + (i * 11) % 60 for i in range(120)], seed=9)
    for i in range(10, 120, 10):
        seqs[i] = seqs[i - 7]  # same sequence, another id
    for i in range(5, 120, 20):  # same first MAX residues, different tails
        seqs[i + 1] = seqs[i][:MAX] + "W" * 12 + seqs[i + 1][MAX:]
        seqs[i] = seqs[i][:MAX] + "K" * 9
    return [(f"r{i:03d}", s) for i, s in enumerate(seqs)]


def _digest(seq: str) -> bytes:
    return hashlib.blake2b(seq.encode(), digest_size=16).digest()


def test_the_partition_rule_as_documented():
    """The shard of a sequence: the first 8 bytes of blake2b-16 of its UTF-8, little-endian,
    mod N (docs/cluster.md; the merge tests' store_shards.shard_of relies on it too)."""
    from store_shards import shard_of as helper_shard_of

    for seq in random_proteins([1, 7, 300], seed=1) + ["MKT"]:
        for count in (1, 2, 7, 16):
            expected = int.from_bytes(_digest(seq)[:8], "little") % count
            assert shard_of(_digest(seq), count) == expected == helper_shard_of(seq, count)
            assert Shard(expected, count).holds_sequence(seq)
            assert not any(Shard(i, count).holds_sequence(seq)
                           for i in range(count) if i != expected)


@pytest.mark.parametrize("text, index, count", [("0/1", 0, 1), ("3/8", 3, 8), (" 15 / 16 ", 15, 16)])
def test_shard_labels(text, index, count):
    shard = Shard.parse(text)
    assert (shard.index, shard.count, shard.label) == (index, count, f"{index}/{count}")
    assert shard.name == shard_name(index, count) == f"shard-{index:04d}-of-{count:04d}"
    assert shard_name(3, 12000) == "shard-00003-of-12000"


@pytest.mark.parametrize("text, words", [
    ("8/8", "0 <= I < N"), ("1/0", "N >= 1"), ("-1/4", "expected I/N"), ("3", "expected I/N"),
    ("a/b", "expected I/N"), ("", "expected I/N"), ("1/2/3", "expected I/N")])
def test_bad_shard_labels_are_usage_errors(text, words, tiny_pt, tmp_path):
    with pytest.raises(UsageError, match=words.replace("/", ".")):
        Shard.parse(text)
    fasta = write_fasta(tmp_path / "in.fa", [("p", "MKT")])
    for command in (["embed", fasta, "-m", tiny_pt, "-o", tmp_path / "s.lmdb"],
                    ["predict", fasta, "-l", "500", "-c", tmp_path / "none.pth"]):
        result = cli(*command, f"--shard={text}", "--gpus", "cpu")
        assert result.exit_code == 2, result.output
        assert "--shard" in result.stderr and "Traceback" not in result.output
        assert result.stdout == "" and not (tmp_path / "s.lmdb").exists()


@pytest.mark.parametrize("count", [1, 2, 5])
def test_the_partition_is_complete_disjoint_and_by_embedded_sequence(count):
    recs = [FastaRecord(rid, seq, "in.fa", 0, i) for i, (rid, seq) in enumerate(_records())]
    tokenizer = EsmTokenizer()
    owner: dict[str, int] = {}
    for index in range(count):
        chunk = prepare_chunk(recs, tokenizer, MAX, Shard(index, count))
        for rid in chunk.ids:
            assert rid not in owner, f"{rid} in shards {owner[rid]} and {index}"
            owner[rid] = index
        # what a chunk holds is the same as without a shard, minus the other shards' records
        whole = prepare_chunk(recs, tokenizer, MAX)
        at = {rid: i for i, rid in enumerate(whole.ids)}
        for i, rid in enumerate(chunk.ids):
            j = at[rid]
            assert chunk.digests[i] == whole.digests[j]
            assert np.array_equal(chunk.token_ids(i), whole.token_ids(j))
            assert chunk.truncated[i] == whole.truncated[j]
    assert sorted(owner) == sorted(r.id for r in recs)  # complete
    by_embedded: dict[str, set[int]] = {}
    for rec in recs:
        by_embedded.setdefault(rec.sequence[:MAX], set()).add(owner[rec.id])
    assert all(len(shards) == 1 for shards in by_embedded.values())
    assert any(len({r.sequence for r in recs if r.sequence[:MAX] == s}) > 1
               for s in by_embedded)  # the input does hold sequences equal only once truncated


def test_validation_counts_the_shard_as_the_reader_keeps_it(tmp_path):
    """The first pass counts the shard's valid records (repeats and conflicting duplicates
    that validation skips are not counted), and both readers — in the planner's thread and
    in the child process — keep exactly those."""
    recs = _records()
    fasta = write_fasta(tmp_path / "in.fa", recs + [recs[3], ("r007", "MKTAYIAK"), ("bad", "J")])
    seen = set()
    for index in range(3):
        shard = Shard(index, 3)
        source = validated_fasta([fasta], ALPHABET, skip_invalid=True, stored=None,
                                 shard=shard, max_residues=MAX)
        for process in (False, True):
            reader = open_input(source, EsmTokenizer(), MAX, process)
            try:
                ids = [rid for chunk in reader.chunks() for rid in chunk.ids]
            finally:
                reader.close()
            assert len(ids) == len(set(ids)) == source.count, (index, process)
            assert source.counts()["shard"] == f"{index}/3"
            seen.update(ids)
        expected = sum(len(s) for rid, s in recs if rid != "r007"
                       and shard.holds_sequence(s[:MAX]))
        assert source.residues == expected
    valid = validate([fasta], alphabet=ALPHABET, skip_invalid=True)
    assert "r007" not in seen and "bad" not in seen  # the conflicting id is nobody's
    assert len(seen) == valid.valid == len(recs) - 1 and valid.selected is None


def _run_records(path: Path) -> list[dict]:
    with EmbeddingStore(path) as store:
        return list(store.runs().values())


def test_shards_of_embed_merge_into_what_one_run_writes(tiny_pt, tmp_path):
    recs = _records()
    fasta = write_fasta(tmp_path / "in.fa", recs)
    common = ["--gpus", "cpu", "--max-residues", str(MAX), "-q"]
    single = embed(fasta, tiny_pt, tmp_path / "single.lmdb", *common)
    assert single["shard"] == "" and single["committed_records"] == len(recs)
    stores, total = [], 0
    for index in range(3):
        out = tmp_path / f"shard{index}.lmdb"
        summary = embed(fasta, tiny_pt, out, *common, "--shard", f"{index}/3")
        expected = {rid for rid, s in recs if shard_of(_digest(s[:MAX]), 3) == index}
        assert summary["shard"] == f"{index}/3"
        assert summary["shard_records"] == summary["committed_records"] == len(expected)
        assert summary["valid_records"] == len(recs)
        with EmbeddingStore(out) as store:
            assert set(store.ids()) == expected
        (run,) = _run_records(out)
        assert run["info"]["shard"] == f"{index}/3" and run["status"] == "complete"
        assert run["info"]["input_fingerprint"] == _run_records(
            tmp_path / "single.lmdb")[0]["info"]["input_fingerprint"]
        stores.append(out)
        total += len(expected)
    assert total == len(recs)
    merged = merge_stores(tmp_path / "merged.lmdb", stores, verify=True)
    assert merged.verify.ok
    with EmbeddingStore(tmp_path / "merged.lmdb") as a, \
            EmbeddingStore(tmp_path / "single.lmdb") as b:
        assert a.spec == b.spec and list(a.ids()) == list(b.ids())
        for (x_id, x), (y_id, y) in zip(a.items(), b.items(), strict=True):
            assert x_id == y_id
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


class _StopAfterFirstCommit:
    """A progress sink that asks the run to stop once something is committed."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def stage(self, message):
        pass

    def start(self, total, residues):
        pass

    def update(self, snapshot):
        if snapshot.committed_records:
            self.stop.set()

    def close(self):
        pass


def test_a_shard_resumes(tiny_pt, tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    seqs = random_proteins([20 + (i * 7) % 50 for i in range(600)], seed=3)
    fasta = write_fasta(tmp_path / "in.fa", [(f"q{i}", s) for i, s in enumerate(seqs)])
    shard = Shard(1, 2)
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         devices="cpu", max_tokens=128, commit_every=8, shard=shard)
    stop = threading.Event()
    first = run_embed(config, _StopAfterFirstCommit(stop), stop)
    assert first.interrupted and 0 < first.committed_records < first.shard_records
    second = run_embed(config)
    assert not second.interrupted and second.shard == "1/2"
    assert second.already_stored == first.committed_records
    assert first.committed_records + second.committed_records == second.shard_records
    with EmbeddingStore(tmp_path / "s.lmdb") as store:
        assert sorted(store.ids()) == sorted(f"q{i}" for i, s in enumerate(seqs)
                                             if shard.holds_sequence(s))
    (run,) = _run_records(tmp_path / "s.lmdb")
    assert run["resumes"] == 1 and run["status"] == "complete" and run["info"]["shard"] == "1/2"


@pytest.fixture
def models(predict_models):
    """(esm, dna, mlp, mlp_path): the tiny predict models (read-only)."""
    return predict_models


def test_predict_shards_keep_reads_whole_and_merge_into_one_runs_outputs(models, tmp_path):
    reads = dict(reads_fasta(tmp_path / "reads.fasta", n=40))
    fasta = tmp_path / "reads.fasta"
    single = _predict(fasta, models, tmp_path / "single")
    owner: dict[str, int] = {}
    for index in range(3):
        summary = _predict(fasta, models, tmp_path / f"s{index}", "--shard", f"{index}/3")
        assert summary["shard"] == f"{index}/3"
        rows = (tmp_path / f"s{index}" / "prediction_results_reads.tsv").read_text()
        shard_reads = [line.split("\t")[0] for line in rows.splitlines()[1:]]
        assert summary["reads"] == len(shard_reads)
        for rid in shard_reads:
            assert rid not in owner
            owner[rid] = index
            assert Shard(index, 3).holds_sequence(reads[rid].upper())
        frames = (tmp_path / f"s{index}" / "prediction_results.txt").read_text()
        for line in frames.splitlines()[1:]:  # every frame belongs to a read of this shard
            assert owner[line.split("\t")[0].rpartition("_chunk_")[0]] == index
    non_empty = [rid for rid, seq in reads.items() if seq]
    assert sorted(owner) == sorted(non_empty)
    stores = [tmp_path / f"s{i}" / "embeddings.lmdb" for i in range(3)]
    merge_stores(tmp_path / "merged" / "embeddings.lmdb", stores)
    scored = _predict(fasta, models, tmp_path / "merged", "--score-only")
    assert scored["embed"] == {} and scored["frames"] == single["frames"]
    # the same three files, rows in the same order; the features of the merged shards were
    # computed in other batches than the single run's (fp32 CPU: equal within 1e-6)
    for name in OUTPUTS:
        a = (tmp_path / "single" / name).read_text().splitlines()
        b = (tmp_path / "merged" / name).read_text().splitlines()
        assert [r.split("\t")[0] for r in a] == [r.split("\t")[0] for r in b], name
    # and from the same features, byte for byte what one ordinary run writes
    again = _predict(fasta, models, tmp_path / "again", "--store",
                     tmp_path / "merged" / "embeddings.lmdb")
    assert again["embed"]["esm"]["embedded"] == 0
    for name in OUTPUTS:
        assert (tmp_path / "again" / name).read_bytes() == \
            (tmp_path / "merged" / name).read_bytes(), name


def test_score_only_names_a_missing_frame(models, tmp_path):
    reads_fasta(tmp_path / "reads.fasta", n=12)
    _predict(tmp_path / "reads.fasta", models, tmp_path / "s0", "--shard", "0/2")
    result = _predict(tmp_path / "reads.fasta", models, tmp_path / "all", "--store",
                      tmp_path / "s0" / "embeddings.lmdb", "--score-only", code=1)
    assert "has no" in result.stderr and "--score-only" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
