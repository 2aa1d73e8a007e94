"""The first pass read as blocks (``gpuengine.block_validation``) finds what the line-by-line
pass finds: the same report, the same problems at the same places, the same errors."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

import gpuengine.block_validation as block_validation
import gpuengine.fasta as fasta
from gpuengine.errors import InputError
from gpuengine.fasta import stream_valid, validate
from gpuengine.records import FastaRecord, RecordProblem

PROTEIN = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO*")
DNA = frozenset("ACGTN")


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def line_by_line(monkeypatch) -> None:
    """Make the first pass read every file line by line (the reference)."""
    monkeypatch.setattr(block_validation, "first_pass_blocks", lambda *args, **kwargs: None)


def outcome(fn, *args, **kwargs):
    """The report (problems as their descriptions) or the error message of a call."""
    try:
        report = fn(*args, **kwargs)
    except InputError as exc:
        return "error", str(exc)
    return report, [p.describe() for p in report.problems]


def spy_on(patch, module, name: str) -> list[bool]:
    """Replace the first pass ``module.name`` by a spy; per call, whether it took the file."""
    taken, real = [], getattr(module, name)

    def spy(*args, **kw):
        found = real(*args, **kw)
        taken.append(found is not None)
        return found

    patch.setattr(module, name, spy)
    return taken


def both_ways(monkeypatch, paths, **kwargs):
    """validate() read as blocks, then line by line: asserts the block pass ran."""
    with monkeypatch.context() as patch:
        taken = spy_on(patch, block_validation, "first_pass_blocks")
        blocks = outcome(validate, paths, **kwargs)
    with monkeypatch.context() as patch:
        line_by_line(patch)
        lines = outcome(validate, paths, **kwargs)
    return blocks, lines, taken


def messy_fasta(rng: random.Random, records: int) -> str:
    """Records of every kind the quick checks refuse or pass, on one line or several."""
    out = []
    for i in range(records):
        kind = rng.random()
        rid = f"r{rng.randrange(records)}"
        header = rid + rng.choice(["", " some text", "\tx", "  y z"])
        if kind < 0.03:
            header = rng.choice(["", " ", " lead", "\u00e9t\u00e9", "a\x1fb", "x\u00a0y"])
        source = random.Random(rid) if rng.random() < 0.8 else rng  # repeats: mostly the same
        seq = "".join(source.choice("ACGTNacgtn") for _ in range(source.randrange(1, 40)))
        if kind > 0.97:
            seq = rng.choice(["", "ACGJT", "AC*GT", "ACGT*", "AC GT", "\u00dfAC", "AC\u00a0GT"])
        if rng.random() < 0.3 and len(seq) > 4:
            cut = rng.randrange(1, len(seq))
            seq = seq[:cut] + rng.choice(["\n", "\n\n", " \n"]) + seq[cut:]
        out.append(f">{header}\n{seq}\n")
    return "".join(out)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_bytes", [64, 1 << 19])
def test_blocks_and_lines_give_the_same_report(tmp_path, monkeypatch, seed, block_bytes):
    rng = random.Random(seed)
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", block_bytes)
    a = write(tmp_path / "a.fa", messy_fasta(rng, 300))
    b = write(tmp_path / "b.fa.gz", gzip.compress(messy_fasta(rng, 200).replace("\n", "\r\n")
                                                  .encode()))
    for alphabet in (DNA, None):
        blocks, lines, taken = both_ways(monkeypatch, [a, b], alphabet=alphabet,
                                         skip_invalid=True)
        assert taken == [True, True]
        assert blocks == lines
        report = blocks[0]
        assert report.problem_count > 0 and report.duplicate_records > 0
        assert (list(stream_valid([a, b], report, alphabet=alphabet))
                == list(stream_valid([a, b], lines[0], alphabet=alphabet)))


def test_simple_reads_take_the_quick_way_and_agree(tmp_path, monkeypatch):
    reads = "".join(f">read{i}\n{'ACGT' * 10}{'acgtn'[i % 5]}\n" for i in range(2000))
    path = write(tmp_path / "r.fa", reads + ">read7\nACGT\n>x\nAC\n")
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 4096)
    blocks, lines, taken = both_ways(monkeypatch, [path], alphabet=DNA, skip_invalid=True)
    assert taken == [True] and blocks == lines
    assert [p.split(": ", 2)[1] for p in blocks[1]] == ["record 'read7' (#2001 in file)"]
    assert blocks[0].valid == 2000 and blocks[0].residues == 2000 * 41 - 41 + 2


def test_error_message_names_the_same_places(tmp_path, monkeypatch):
    path = write(tmp_path / "a.fa", "\n\n>good\nMK\n>bad1 d\nMK\nAAJ\n>e\n\n>\nMK\n")
    blocks, lines, taken = both_ways(monkeypatch, [path], alphabet=PROTEIN)
    assert taken == [True] and blocks == lines
    assert f"{path}:7:3: record 'bad1' (#2 in file): invalid-character 'J'" in blocks[1]


@pytest.mark.parametrize("data", [
    b">a\nMK\n>b\nG\xffG\n",  # not UTF-8
    b">a\nMK\n@b\nGG\n",  # fine: '@' in a FASTA sequence line is a character problem
    b"@a\nMK\n+\nII\n",  # FASTQ
    b"",  # empty
    b"hello\n>a\nMK\n",  # not FASTA
])
def test_files_the_blocks_leave_give_the_line_pass_errors(tmp_path, monkeypatch, data):
    path = write(tmp_path / "a.fa", data)
    blocks, lines, _ = both_ways(monkeypatch, [path], alphabet=PROTEIN)
    assert blocks == lines


def test_truncated_gzip_gives_the_line_pass_error(tmp_path, monkeypatch):
    packed = gzip.compress(messy_fasta(random.Random(5), 5000).encode())
    path = write(tmp_path / "a.fa.gz", packed[:len(packed) // 2])
    blocks, lines, taken = both_ways(monkeypatch, [path], alphabet=DNA, skip_invalid=True)
    assert taken == [False] and blocks == lines and blocks[0] == "error"
    assert "truncated or corrupt gzip data" in blocks[1]


def test_hash_collisions_in_the_block_pass_never_give_false_problems(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta, "_hash_bytes", lambda data: 1)
    a = write(tmp_path / "a.fa", ">a\nMK\n>b\nGG\n>c\nMK\n>a\nMK\n")
    b = write(tmp_path / "b.fa", ">d\nW\n>b\nGA\n")
    blocks, lines, taken = both_ways(monkeypatch, [a, b], alphabet=PROTEIN, skip_invalid=True)
    assert taken == [True, True] and blocks == lines
    report = blocks[0]
    assert [(p.kind, p.record_id, p.line) for p in report.problems] == [
        ("conflicting-duplicate", "b", 3)]
    assert report.skip == {(str(a), 1), (str(a), 3), (str(b), 1)}


class Stored:
    """A store holding ids ``b`` (another sequence) and ``a`` (the same one)."""

    def __init__(self):
        self.asked: list[str] = []

    def conflict(self, rec: FastaRecord) -> RecordProblem | None:
        self.asked.append(rec.id)
        if rec.id == "b":
            return RecordProblem("store-conflict", rec.path, rec.line, rec.id, rec.index,
                                 detail="the store holds another sequence for this id")
        return None


class StoredWithHeld(Stored):
    def __init__(self):
        super().__init__()
        self.held_calls = 0

    def held(self, ids):
        self.held_calls += 1
        return [i for i, rid in enumerate(ids) if rid in ("a", "b")]


def test_store_is_asked_only_about_the_ids_it_holds(tmp_path, monkeypatch):
    path = write(tmp_path / "a.fa", ">a\nMK\n>b x\nGG\n>c\nJ\n>d\nW\n")
    stored = StoredWithHeld()
    report = validate([path], alphabet=PROTEIN, skip_invalid=True, stored=stored)
    assert stored.asked == ["a", "b"] and stored.held_calls >= 1  # once a block
    plain = Stored()
    line_by_line(monkeypatch)
    reference = validate([path], alphabet=PROTEIN, skip_invalid=True, stored=plain)
    assert plain.asked == ["a", "b", "d"]  # every valid record, the line pass's way
    assert report == reference
    assert [p.kind for p in report.problems] == ["store-conflict", "invalid-character"]


def test_a_store_without_held_is_asked_about_every_valid_record(tmp_path):
    path = write(tmp_path / "a.fa", ">a\nMK\n>b x\nGG\n>c\nJ\n>d\nW\n")
    stored = Stored()
    report = validate([path], alphabet=PROTEIN, skip_invalid=True, stored=stored)
    assert stored.asked == ["a", "b", "d"]
    assert report.valid == 2


def messy_fastq(rng: random.Random, records: int) -> str:
    """Sound FASTQ records of ASCII (a bad residue, an empty id or sequence now and then)."""
    out = []
    for i in range(records):
        rid = f"q{rng.randrange(records)}"
        title = rid + rng.choice(["", " extra", "\tx"])
        if rng.random() < 0.03:
            title = rng.choice(["", " lead", "  "])
        source = random.Random(rid) if rng.random() < 0.8 else rng
        seq = "".join(source.choice("ACGTNacgtn") for _ in range(source.randrange(0, 30)))
        if rng.random() < 0.03:
            seq = rng.choice(["ACJT", "AC*T", "ACGT*", "A CT"])
        plus = rng.choice(["+", "+" + title])
        out.append(f"@{title}\n{seq}\n{plus}\n{'I' * len(seq)}\n")
    return "".join(out)


@pytest.mark.parametrize("seed", range(3))
def test_fastq_blocks_and_lines_give_the_same_report(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 128)
    a = write(tmp_path / "a.fq", messy_fastq(rng, 300))
    b = write(tmp_path / "b.fq.gz", gzip.compress(messy_fastq(rng, 100).encode() + b"\n\n"))
    blocks, lines, taken = both_ways(monkeypatch, [a, b], alphabet=DNA, skip_invalid=True)
    assert blocks == lines
    assert taken == [True, True]
    assert blocks[0].problem_count > 0


@pytest.mark.parametrize("bad", [
    "@a\nACGT\n+\nIII\n",  # qualities shorter
    "@a\nACGT\n+b\nIIII\n",  # another title on the '+' line
    "@a\nACGT\nIIII\n",  # no '+' line: the file ends inside a record
    "@a\nACGT\n+\nIIII\n\n",  # a blank line between records
    "a\nACGT\n+\nIIII\n",  # no '@'
])
def test_malformed_fastq_gives_the_line_pass_error(tmp_path, monkeypatch, bad):
    good = "".join(f"@r{i}\nACGT\n+\nIIII\n" for i in range(50))
    path = write(tmp_path / "a.fq", good + bad + good.replace("@r", "@s"))
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 64)
    blocks, lines, taken = both_ways(monkeypatch, [path], alphabet=DNA, skip_invalid=True)
    assert taken == [False] and blocks == lines and blocks[0] == "error"


@pytest.mark.parametrize("max_problems", [0, 3, 40])
def test_problems_kept_up_to_the_cap_and_all_counted(tmp_path, monkeypatch, max_problems):
    a = write(tmp_path / "a.fa", "".join(f">a{i}\nAC{'J' if i % 3 else ''}\n" for i in range(60)))
    b = write(tmp_path / "b.fa", "".join(f">b{i}\n{'AJ' if i % 2 else 'A'}\n" for i in range(30)))
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 64)
    blocks, lines, taken = both_ways(monkeypatch, [a, b], alphabet=DNA, skip_invalid=True,
                                     max_problems=max_problems)
    assert taken == [True, True] and blocks == lines
    assert blocks[0].problem_count == 55 and len(blocks[0].problems) == min(55, max_problems)


# -- the first pass shared among validation processes (gpuengine.validation_workers) ----------

def in_processes(monkeypatch, paths, processes=4, **kwargs):
    """validate() sharing every file among ``processes`` validation processes (blocks of the
    size the test set): asserts the processes took every file."""
    from gpuengine import validation_workers
    from gpuengine.validation_workers import SharedPass

    with monkeypatch.context() as patch:
        taken = spy_on(patch, validation_workers, "tally_in_processes")
        got = outcome(validate, paths, shared=SharedPass(processes, min_bytes=0), **kwargs)
    return got, taken


def children_of_this_process() -> list[int]:
    import os

    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    return pids


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("processes", [4, 5])
def test_processes_give_the_one_process_report(tmp_path, monkeypatch, seed, processes):
    rng = random.Random(seed)
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 256)
    a = write(tmp_path / "a.fa", messy_fasta(rng, 400))
    b = write(tmp_path / "b.fa.gz", gzip.compress(messy_fasta(rng, 200).replace("\n", "\r\n")
                                                  .encode()))
    q = write(tmp_path / "c.fq", messy_fastq(rng, 200))
    before = children_of_this_process()
    for alphabet in (DNA, None):
        shared, taken = in_processes(monkeypatch, [a, b, q], processes, alphabet=alphabet,
                                     skip_invalid=True, max_problems=25)
        assert taken == [True, True, True]
        _, lines, _ = both_ways(monkeypatch, [a, b, q], alphabet=alphabet, skip_invalid=True,
                                max_problems=25)
        assert shared == lines
        assert shared[0].problem_count > 25 and len(shared[0].problems) == 25
        assert shared[0].duplicate_records > 0
    assert children_of_this_process() == before  # every child reaped


def test_processes_take_a_shard_as_one_process(tmp_path, monkeypatch):
    from gpuengine.shards import Shard

    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 512)
    path = write(tmp_path / "a.fa", messy_fasta(random.Random(9), 600))
    for max_residues in (None, 7):
        select = Shard(1, 3).selector(max_residues)
        shared, taken = in_processes(monkeypatch, [path], alphabet=DNA, skip_invalid=True,
                                     select=select)
        one = outcome(validate, [path], alphabet=DNA, skip_invalid=True, select=select)
        assert taken == [True] and shared == one
        assert 0 < shared[0].selected < shared[0].valid


def test_processes_leave_held_ids_to_the_store_check_here(tmp_path, monkeypatch):
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 64)
    path = write(tmp_path / "a.fa", "".join(f">r{i}\nMK\n" for i in range(40))
                 + ">a\nMK\n>b x\nGG\n>c\nJ\n>d\nW\n")
    stored = StoredWithHeld()
    shared, taken = in_processes(monkeypatch, [path], alphabet=PROTEIN, skip_invalid=True,
                                 stored=stored)
    assert taken == [True] and stored.asked == ["a", "b"]
    line_by_line(monkeypatch)
    assert shared == outcome(validate, [path], alphabet=PROTEIN, skip_invalid=True,
                             stored=Stored())
    assert [p.kind for p in shared[0].problems] == ["store-conflict", "invalid-character"]


@pytest.mark.parametrize("data", [
    b">a\nMK\n" * 200 + b">b\nG\xffG\n" + b">c\nMK\n" * 200,  # not UTF-8 in the middle
    b"hello\n>a\nMK\n",  # not FASTA
])
def test_processes_leave_bad_files_to_the_line_pass(tmp_path, monkeypatch, data):
    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 64)
    path = write(tmp_path / "a.fa", data)
    shared, _ = in_processes(monkeypatch, [path], alphabet=PROTEIN)
    _, lines, _ = both_ways(monkeypatch, [path], alphabet=PROTEIN)
    assert shared == lines and shared[0] == "error"


def test_small_files_and_other_selections_stay_in_this_process(tmp_path):
    from gpuengine.shards import Shard
    from gpuengine.validation_workers import VALIDATION_PROCESS_MIN, SharedPass, takes_on

    eight = SharedPass(8)
    path = write(tmp_path / "a.fa", ">a\nMK\n")
    assert not takes_on(path, eight, None)  # below the size
    assert takes_on(path, SharedPass(8, min_bytes=0), None)
    big = tmp_path / "big.fa"
    with open(big, "wb") as fh:
        fh.truncate(eight.min_bytes)
    assert takes_on(big, eight, None)
    assert takes_on(big, eight, Shard(0, 2).selector(None))
    assert not takes_on(big, None, None)
    assert not takes_on(big, SharedPass(VALIDATION_PROCESS_MIN - 1), None)
    assert not takes_on(big, eight, lambda seq: True)
    assert not takes_on(tmp_path / "missing.fa", eight, None)


def test_a_small_file_and_a_shared_one_hash_alike(tmp_path, monkeypatch):
    """A small file read here and a large one by processes, with ids repeated across them (same
    and other sequences): one hash for both, so the repeats are found and re-read."""
    from gpuengine import validation_workers
    from gpuengine.validation_workers import SharedPass

    monkeypatch.setattr(block_validation, "BLOCK_BYTES", 128)
    big = write(tmp_path / "big.fa", "".join(f">r{i}\nACGT{'A' * (i % 7)}\n" for i in range(300)))
    small = write(tmp_path / "small.fa", ">r5\nACGTC\n>r9\nACGTAA\n>z\nAC\n")
    taken = []
    real = validation_workers.tally_in_processes
    with monkeypatch.context() as patch:
        patch.setattr(validation_workers, "tally_in_processes",
                      lambda *a, **k: taken.append(a[0]) or real(*a, **k))
        shared = outcome(validate, [small, big], alphabet=DNA, skip_invalid=True,
                         shared=SharedPass(4, min_bytes=1000))
    _, lines, _ = both_ways(monkeypatch, [small, big], alphabet=DNA, skip_invalid=True)
    assert taken == [big] and shared == lines
    report = shared[0]
    assert report.duplicate_records == 1  # r9: the same sequence
    assert [(p.kind, p.record_id) for p in report.problems] == [("conflicting-duplicate", "r5")]


def test_a_failing_validation_process_reports_its_error_as_a_bug():
    """A child's error reaches the engine as a FAIL frame (after what it wrote) and is raised
    there as an InternalError naming the validation process; the child is reaped."""
    from gpuengine.errors import InternalError
    from gpuengine.validation_workers import _Child

    child = _Child(b"{not json")
    try:
        with pytest.raises(InternalError, match="validation process.*JSONDecodeError"):
            child.answer()
        assert child.proc.wait(timeout=30) == 1
    finally:
        child.close()
