"""`gpuengine predict`'s fast paths change nothing: the frames read by input processes (made,
hashed and tokenized in the children that parse the reads, ``inputs.Derivation``) give the
same three output files, byte for byte, as the frames made in the planner's thread; and the
scores read back in bulk equal the scores of features looked up one frame id at a time. CPU,
tiny random predict_models (conftest's ``predict_models``), real input processes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gpuengine.shards import Shard
from gpuengine.store.reader import EmbeddingStore
from gpuengine.workflows.virnucpro.classifier import load_classifier
from gpuengine.workflows.virnucpro.outputs import PredictionWriter
from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

OUTPUTS = ("prediction_results.txt", "prediction_results_highestscore.csv",
           "prediction_results_reads.tsv")


def predict(tmp_path, predict_models, monkeypatch, name: str, *, processes: bool,
            shard: Shard | None = None):
    """One predict run into ``tmp_path/name`` (a store of its own), its frames read in two
    input processes (blocks of about 20 reads) or in the planner's thread."""
    esm, dna, _, mlp_path = predict_models
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1" if processes else "0")
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "4000")
    config = PredictConfig(reads=tmp_path / "reads.fasta", length=500, classifier=mlp_path,
                           esm_model=str(esm), dnabert_model=str(dna), out=tmp_path / name,
                           devices="cpu", allow_download=False, shard=shard,
                           max_tokens=64)  # the CPU's smallest budget: one frame a batch
    return run_predict(config)


def write_reads(path, n=120, seed=17):
    """Reads of 300 to 1 500 bp (one to three chunks; every kept frame is longer than 64
    tokens for both models, so each batch holds one sequence and the CPU's arithmetic cannot
    depend on what a batch was packed with), lower case and ambiguous bases among them, a
    2-bp read (no frame), an empty record and a repeated one."""
    rng = random.Random(seed)
    reads = []
    for i in range(n):
        seq = "".join(rng.choice("ACGT") for _ in range(rng.choice([300, 420, 500, 620, 1001,
                                                                    1498])))
        if i % 7 == 3:
            seq = seq[:40] + "NNRY" + seq[44:]
        if i % 11 == 5:
            seq = seq.lower()
        reads.append((f"read{i}", seq))
    reads.append(("tiny", "AC"))
    text = "".join(f">{rid} sample\n{seq}\n" for rid, seq in reads)
    path.write_text(text + ">empty\n\n" + f">read3 again\n{reads[3][1]}\n")
    return reads


@pytest.fixture
def reads(tmp_path):
    return write_reads(tmp_path / "reads.fasta")


@pytest.mark.parametrize("shard", [None, Shard(1, 2)], ids=["whole", "shard-1-of-2"])
def test_input_processes_give_the_same_outputs_byte_for_byte(tmp_path, predict_models, monkeypatch,
                                                             reads, shard):
    threaded = predict(tmp_path, predict_models, monkeypatch, "thread", processes=False, shard=shard)
    children = predict(tmp_path, predict_models, monkeypatch, "children", processes=True, shard=shard)
    assert children.frames == threaded.frames > 0
    assert children.reads == threaded.reads and children.empty_reads == threaded.empty_reads == 1
    for stage in ("dnabert", "esm"):
        ours, theirs = children.embed[stage], threaded.embed[stage]
        for key in ("records_read", "valid_records", "embedded", "deduplicated", "tokens"):
            assert ours[key] == theirs[key], (stage, key)
        assert ours["records_read"] == children.frames  # frames, not reads
    for name in OUTPUTS:
        assert (tmp_path / "children" / name).read_bytes() == \
            (tmp_path / "thread" / name).read_bytes(), name


def test_bulk_scores_equal_scores_of_features_looked_up_one_by_one(tmp_path, predict_models,
                                                                   monkeypatch, reads):
    """The score stage reads features in bulk into one reused buffer; scoring features read
    one frame id at a time (``store[id]``) and joined with np.concatenate, as before, writes
    the same prediction file, byte for byte."""
    _, _, _, mlp_path = predict_models
    predict(tmp_path, predict_models, monkeypatch, "run", processes=True)
    out = tmp_path / "run"
    lines = (out / "prediction_results.txt").read_text().splitlines()
    frame_ids = [line.split("\t")[0] for line in lines[1:]]
    store = out / "embeddings.lmdb"
    with EmbeddingStore(store, table="dnabert") as dna, EmbeddingStore(store, table="esm") as esm:
        features = np.concatenate([np.stack([dna[f] for f in frame_ids]),
                                   np.stack([esm[f] for f in frame_ids])],
                                  axis=1).astype(np.float32)
        classifier = load_classifier(mlp_path, feature_size=dna.spec.dim + esm.spec.dim)
    scores = classifier.score(features)
    with PredictionWriter(tmp_path / "one_by_one.txt") as writer:
        writer.write(frame_ids, scores.scores, scores.virus)
    assert (tmp_path / "one_by_one.txt").read_bytes() == \
        (out / "prediction_results.txt").read_bytes()


def test_bulk_get_many_equals_lookups_and_names_a_missing_id(tmp_path, predict_models, monkeypatch,
                                                            reads):
    predict(tmp_path, predict_models, monkeypatch, "run", processes=False)
    store = tmp_path / "run" / "embeddings.lmdb"
    with EmbeddingStore(store, table="esm") as esm:
        ids = list(esm.ids())[:40]
        many = esm.get_many(ids)
        assert many.flags.writeable and many.shape == (len(ids), esm.spec.dim)
        assert np.array_equal(many, np.stack([esm[i] for i in ids]))
        assert esm.get_many([]).shape == (0, esm.spec.dim)
        skipped = esm.get_many([ids[0], "no-such-frame", ids[1]], missing="skip")
        assert np.array_equal(skipped, many[:2])
        with pytest.raises(KeyError, match="no-such-frame"):
            esm.get_many([ids[0], "no-such-frame"])


def test_read_summary_written_in_bulk_equals_its_rows_and_refuses_a_repeated_read(tmp_path):
    """ConsensusCollector registers a block of reads at once and writes the per-read summary
    line by line: the same text as its rows joined with tabs (scores as numpy float32 str(),
    tiny and exact ones included); a read id given twice, in one block or two, is refused
    naming it."""
    from gpuengine.workflows.virnucpro.outputs import ConsensusCollector

    rng = np.random.default_rng(4)
    collector = ConsensusCollector()
    reads = [f"r{i}" for i in range(3000)]
    chunks = rng.integers(0, 4, len(reads))
    collector.add_reads(reads[:1000], chunks[:1000])
    collector.add_reads(reads[1000:], chunks[1000:])
    frames = [f"{r}_chunk_{k}{f}" for r, n in zip(reads, chunks) for k in range(1, n + 1)
              for f in ("F1", "R2") if rng.random() < 0.4]
    virus = rng.random(len(frames)).astype(np.float32)
    virus[:4] = [1e-5, 1e-30, 1.0, 0.1]
    collector.add_frames(frames, np.stack([1 - virus, virus], axis=1))
    assert collector.write_read_summary(tmp_path / "reads.tsv") == len(reads)
    lines = (tmp_path / "reads.tsv").read_text().splitlines()
    assert lines[1:] == ["\t".join(map(str, row)) for row in collector.read_rows()]
    assert {line.split("\t")[5] for line in lines[1:]} == {"virus", "others", "unscored"}
    with pytest.raises(ValueError, match="'r5' registered twice"):
        collector.add_reads(["new1", "r5"], [1, 1])
    with pytest.raises(ValueError, match="'dup' registered twice"):
        collector.add_reads(["dup", "dup"], [1, 1])
