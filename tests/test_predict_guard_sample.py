"""predict's fp8 guard sample found directly (RecordSource.pick, pipeline._pick_frames): the
same records the guard's full pass (fidelity.sample_evenly over iterate()) picks, over blocks,
shards, empty and invalid records."""

from __future__ import annotations

import pytest

from gpuengine.dna_tokenizer import DNA_ALPHABET
from gpuengine.fidelity import GUARD_SAMPLE, sample_evenly, sample_indices
from gpuengine.shards import Shard
from gpuengine.workflows.virnucpro import pipeline
from virnucpro_files import reads_fasta


def records(items):
    return [(r.id, r.sequence, r.path, r.index) for r in items]


@pytest.mark.parametrize("shard", [None, "2/3"])
@pytest.mark.parametrize("column", ["proteins", "nucleotides"])
def test_pick_gives_the_records_of_a_full_pass(tmp_path, monkeypatch, shard, column):
    monkeypatch.setattr(pipeline, "READ_BLOCK", 5)
    path = tmp_path / "reads.fasta"
    reads_fasta(path, n=120)
    with open(path, "a") as handle:
        handle.write(">empty\n\n>more\nACGTACGTACGTAAAGGGCCCTTT\n")
    config = pipeline.PredictConfig(reads=path, length=300, classifier=tmp_path / "x.pth",
                                    shard=None if shard is None else Shard.parse(shard))
    report = pipeline._validate_reads(config, DNA_ALPHABET)
    counts = pipeline._count_frames(config, report)
    assert int(counts["frames_per_read"].sum()) == counts["frames"] > 15
    source = pipeline._frame_source(config, report, column, counts)
    for n in (1, 7, 20, GUARD_SAMPLE):
        expected = sample_evenly(source.iterate(), source.count, n)
        got = source.pick(sample_indices(source.count, n))
        assert records(got) == records(expected)
    assert source.pick([]) == []
    with pytest.raises(IndexError):
        source.pick([source.count])
