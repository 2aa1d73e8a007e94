"""FASTQ and FASTA text of the same reads, for the tests of FASTQ input."""

from __future__ import annotations

import random


def fastq_text(reads, *, plus_title: bool = False) -> str:
    """Four-line records; qualities drawn from characters that also start headers and '+'."""
    rng = random.Random(1)
    out = []
    for rid, seq in reads:
        qual = "".join(rng.choice("!#5?I@+") for _ in seq)
        out.append(f"@{rid} lane=1\n{seq}\n+{f'{rid} lane=1' if plus_title else ''}\n{qual}\n")
    return "".join(out)


def fasta_text(reads) -> str:
    return "".join(f">{rid} lane=1\n{seq}\n" for rid, seq in reads)
