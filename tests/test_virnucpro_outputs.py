"""VirNucPro output files, byte for byte against hand-written text."""

from __future__ import annotations

import numpy as np
import pytest

from gpuengine.workflows.virnucpro.frames import frames_for_batch
from gpuengine.workflows.virnucpro.outputs import (
    ConsensusCollector,
    PredictionWriter,
    format_score,
)

# (frame id, score1, score2): scrambled chunk order, ties, separate maxima, awkward ids.
FRAMES = [
    ("a_chunk_2F1", 0.6, 0.4),
    ("a_chunk_1F1", 0.8, 0.2),
    ("B_chunk_1F2", 0.123456789, 0.876543211),
    ("a_chunk_10R1", 0.5, 0.5),  # a tie: prediction "others", consensus True
    ("_x_chunk_1R3", 0.9999, 1e-4),
    ("a_chunk_2R2", 0.3, 0.7),
    ('q"x_chunk_1F1', 0.25, 0.75),
    ("a_chunk_1F3", 0.45, 0.55),  # virus on its own, but max(score1) = 0.8 wins the chunk
    ("é_chunk_1F1", 0.99999994, 3.4e-08),
]

PREDICTIONS_TXT = (
    "Sequence_ID\tPrediction\tscore1\tscore2\n"
    "a_chunk_2F1\tothers\t0.6\t0.4\n"
    "a_chunk_1F1\tothers\t0.8\t0.2\n"
    "B_chunk_1F2\tvirus\t0.12345679\t0.8765432\n"
    "a_chunk_10R1\tothers\t0.5\t0.5\n"
    "_x_chunk_1R3\tothers\t0.9999\t1e-04\n"
    "a_chunk_2R2\tvirus\t0.3\t0.7\n"
    'q"x_chunk_1F1\tvirus\t0.25\t0.75\n'
    "a_chunk_1F3\tvirus\t0.45\t0.55\n"
    "é_chunk_1F1\tothers\t0.99999994\t3.4e-08\n"
)

# Tab-separated, sorted by code point ('B' < '_' < 'a' < 'q' < 'é'; "a_chunk_10" < "a_chunk_2"),
# a '"' quoted the way pandas' to_csv (Python's csv module) quotes it.
CONSENSUS_CSV = (
    "Modified_ID\tIs_Virus\n"
    "B_chunk_1\tTrue\n"
    "_x_chunk_1\tFalse\n"
    "a_chunk_1\tFalse\n"
    "a_chunk_10\tTrue\n"
    "a_chunk_2\tTrue\n"
    '"q""x_chunk_1"\tTrue\n'
    "é_chunk_1\tFalse\n"
)

READS = [("a", 10), ("B", 1), ("none", 2), ("_x", 1), ('q"x', 1), ("é", 1), ("empty", 0)]

READS_TSV = (
    "Read_ID\tChunks\tScored_Chunks\tVirus_Chunks\tMax_Virus_Score\tCall\n"
    "a\t10\t3\t2\t0.7\tvirus\n"
    "B\t1\t1\t1\t0.8765432\tvirus\n"
    "none\t2\t0\t0\tNA\tunscored\n"
    "_x\t1\t1\t0\t1e-04\tothers\n"
    'q"x\t1\t1\t1\t0.75\tvirus\n'
    "é\t1\t1\t0\t3.4e-08\tothers\n"
    "empty\t0\t0\t0\tNA\tunscored\n"
)


def columns(rows):
    ids = [r[0] for r in rows]
    scores = np.array([[r[1], r[2]] for r in rows], dtype=np.float32)
    return ids, scores


def test_format_score_is_numpy_float32_str():
    assert [format_score(v) for v in (0.123456789, 1e-4, 1e-5, 1.0, 0.5, 0.99999994, 3.4e-8,
                                      0.0, np.float32(0.1))] == [
        "0.12345679", "1e-04", "1e-05", "1.0", "0.5", "0.99999994", "3.4e-08", "0.0", "0.1"]


def test_prediction_file_byte_exact_and_streamed(tmp_path):
    ids, scores = columns(FRAMES)
    path = tmp_path / "prediction_results.txt"
    with PredictionWriter(path) as writer:
        writer.write(ids[:4], scores[:4])
        writer.write([], np.zeros((0, 2), np.float32))
        writer.write(ids[4:], scores[4:].astype(np.float64))  # converted to float32 first
    assert writer.rows == len(FRAMES)
    assert path.read_bytes() == PREDICTIONS_TXT.encode("utf-8")


def test_prediction_file_takes_given_predictions(tmp_path):
    path = tmp_path / "p.txt"
    with PredictionWriter(path) as writer:
        writer.write(["r_chunk_1F1"], [[0.5, 0.5]], virus=[True])
    assert path.read_text() == ("Sequence_ID\tPrediction\tscore1\tscore2\n"
                                "r_chunk_1F1\tvirus\t0.5\t0.5\n")
    with PredictionWriter(tmp_path / "q.txt") as writer:
        with pytest.raises(ValueError, match="NaN"):
            writer.write(["r_chunk_1F1"], [[np.nan, 0.5]])
        with pytest.raises(ValueError, match="shape"):
            writer.write(["r_chunk_1F1", "r_chunk_1F2"], [[0.5, 0.5]])


def test_consensus_and_read_summary_byte_exact(tmp_path):
    ids, scores = columns(FRAMES)
    collector = ConsensusCollector()
    collector.add_reads([r for r, _ in READS[:3]], [n for _, n in READS[:3]])
    for read_id, n_chunks in READS[3:]:
        collector.add_read(read_id, n_chunks)
    for order in ([2, 7, 0], [8, 1, 4], [3, 6, 5]):  # frames of one chunk in separate batches
        collector.add_frames([ids[i] for i in order], scores[order])
    assert collector.write_consensus(tmp_path / "c.csv") == 7
    assert (tmp_path / "c.csv").read_bytes() == CONSENSUS_CSV.encode("utf-8")
    assert collector.write_read_summary(tmp_path / "r.tsv") == len(READS)
    assert (tmp_path / "r.tsv").read_bytes() == READS_TSV.encode("utf-8")
    assert collector.chunk_calls()[:2] == [("B_chunk_1", True), ("_x_chunk_1", False)]


def test_consensus_refuses_bad_input(tmp_path):
    collector = ConsensusCollector()
    collector.add_read("r", 1)
    with pytest.raises(ValueError, match="twice"):
        collector.add_read("r", 1)
    with pytest.raises(ValueError, match="not a frame id"):
        collector.add_frames(["r_chunk_1X9"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="NaN"):
        collector.add_frames(["r_chunk_1F1"], [[0.5, np.inf]])
    collector.add_frames(["s_chunk_1F1"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="no registered read.*s_chunk_1"):
        collector.write_read_summary(tmp_path / "r.tsv")
    empty = ConsensusCollector()
    empty.write_consensus(tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text() == "Modified_ID\tIs_Virus\n"


def test_frames_to_outputs_end_to_end(tmp_path):
    ids = ["long", "stopless", "dead", "empty"]
    seqs = [("GCAAGCGAACCAGGG" * 70)[:1001], "C" * 150, "TTAATTAATTAA", ""]
    fr = frames_for_batch(ids, seqs, 500)
    # score2 = 0.9 for the forward frames of long's second chunk only
    scores = np.array([[0.1, 0.9] if (c == "long_chunk_2" and f < 3) else [0.7, 0.3]
                       for c, f in zip(fr.chunk_ids, fr.frame.tolist())], dtype=np.float32)
    collector = ConsensusCollector()
    collector.add_reads(ids, fr.chunks_per_read)
    collector.add_frames(fr.frame_ids, scores)
    with PredictionWriter(tmp_path / "p.txt") as writer:
        writer.write(fr.frame_ids, scores)
    assert len((tmp_path / "p.txt").read_text().splitlines()) == 1 + 4 * 6
    collector.write_consensus(tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text() == (
        "Modified_ID\tIs_Virus\nlong_chunk_1\tFalse\nlong_chunk_2\tTrue\nlong_chunk_3\tFalse\n"
        "stopless_chunk_1\tFalse\n")
    collector.write_read_summary(tmp_path / "r.tsv")
    assert (tmp_path / "r.tsv").read_text() == (
        "Read_ID\tChunks\tScored_Chunks\tVirus_Chunks\tMax_Virus_Score\tCall\n"
        "long\t3\t3\t1\t0.9\tvirus\n"
        "stopless\t1\t1\t0\t0.3\tothers\n"
        "dead\t1\t0\t0\tNA\tunscored\n"
        "empty\t0\t0\t0\tNA\tunscored\n")
