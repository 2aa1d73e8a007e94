"""Frozen boundary dataclasses shared by the input side of the pipeline.

Data flows one way: FASTA → :class:`FastaRecord` → tokenized work item → packed batch →
batch result → store. Types of the later steps live with the module that produces them
(``packing``, ``scheduler``, ``runner``); this module only holds what the input side hands on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FastaRecord:
    """One record as read from a FASTA file, after normalisation.

    ``sequence`` is upper-cased, has every whitespace character (CR included) removed and one
    trailing ``*`` stripped. ``id`` is the header up to the first whitespace, exactly as
    Biopython's ``SeqIO.parse(..., "fasta")`` reads it.
    """

    id: str
    sequence: str
    path: str
    """The file the record came from, as given by the user."""
    line: int
    """1-based line number of the record's header line."""
    index: int
    """0-based ordinal of the record within its file."""


@dataclass(frozen=True, slots=True)
class RecordProblem:
    """Why one record cannot be embedded, with everything a user needs to find it."""

    kind: str
    """One of ``empty-id``, ``empty-sequence``, ``invalid-character``, ``conflicting-duplicate``,
    ``store-conflict``."""
    path: str
    line: int
    """1-based line of the problem (the offending character's line, or the header line)."""
    record_id: str
    index: int
    """0-based ordinal of the record within its file."""
    column: int | None = None
    """1-based column of the offending character, where there is one."""
    character: str | None = None
    detail: str = ""

    def describe(self) -> str:
        where = f"{self.path}:{self.line}" + (f":{self.column}" if self.column else "")
        rid = self.record_id if self.record_id else "<empty id>"
        text = f"{where}: record {rid!r} (#{self.index + 1} in file): {self.kind}"
        if self.character is not None:
            text += f" {self.character!r} (U+{ord(self.character):04X})"
        if self.detail:
            text += f": {self.detail}"
        return text
