"""Sequences to token ids.

ESM-2 uses fair-esm's "ESM-1b" alphabet: one token per residue character, ``<cls>`` (0) as BOS
and ``<eos>`` (2) appended, so a protein of n residues becomes n + 2 tokens. The lookup is a
256-entry table applied to the ASCII bytes with numpy, so tokenizing a million short proteins
takes a few seconds on one core.

Which characters are accepted is the validator's business (:data:`ESM_RESIDUES` is handed to
it as the model's alphabet), so by the time a sequence reaches :class:`EsmTokenizer` every
character is known to be valid; an unknown one here is a bug.
"""

from __future__ import annotations

import numpy as np

from gpuengine.errors import InternalError

ESM_TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y",
    "M", "H", "W", "C", "X", "B", "U", "Z", "O",
    ".", "-", "<null_1>", "<mask>",
)  # fmt: skip
"""fair-esm's ESM-1b alphabet; a token's id is its position in this tuple."""

ESM_RESIDUES = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
"""Residue letters a protein may contain (the 20 standard amino acids and X, B, U, Z, O).

Gap characters (``.`` ``-``) and special tokens such as ``<mask>`` are not accepted in input:
they are not residues, and ``<mask>`` would change ESM-2's token-dropout scale."""

ESM_CLS, ESM_PAD, ESM_EOS = 0, 1, 2


class EsmTokenizer:
    """Residue string → ``[<cls>] + residues + [<eos>]`` ids, as fair-esm's ``BatchConverter``."""

    family = "esm2"
    alphabet = ESM_RESIDUES
    specials_per_sequence = 2

    def __init__(self) -> None:
        table = np.full(256, -1, dtype=np.int16)
        for token_id, token in enumerate(ESM_TOKENS):
            if len(token) == 1:
                table[ord(token)] = token_id
        self._table = table

    def encode(self, sequence: str, max_residues: int | None = None) -> np.ndarray:
        """Token ids (int32) with BOS and EOS; residues beyond ``max_residues`` are dropped first
        (fair-esm's ``truncation_seq_length``)."""
        if max_residues is not None:
            sequence = sequence[:max_residues]
        raw = np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)
        ids = np.empty(raw.size + 2, dtype=np.int32)
        ids[0] = ESM_CLS
        ids[-1] = ESM_EOS
        body = self._table[raw]
        if raw.size and body.min() < 0:
            bad = sequence[int(np.argmin(body))]
            raise InternalError(f"unvalidated character {bad!r} reached the ESM tokenizer")
        ids[1:-1] = body
        return ids

    def encode_batch(self, sequences: list[str], max_residues: int | None = None) -> list[np.ndarray]:
        """:meth:`encode` for many sequences: one table lookup over all of them, then views into
        one buffer (a few numpy calls per chunk instead of per sequence)."""
        if max_residues is not None:
            sequences = [s[:max_residues] for s in sequences]
        if not sequences:
            return []
        out, ends = self.encode_flat(sequences)
        starts = [0, *ends[:-1].tolist()]
        return [out[s:e] for s, e in zip(starts, ends.tolist())]  # views, as np.split

    def encode_flat(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence's ids one after the other (int32) and where each one's end (int64,
        cumulative): :meth:`encode_batch` without a view per sequence."""
        if not sequences:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        body = self._table[np.frombuffer("".join(sequences).encode("ascii", "replace"), np.uint8)]
        if body.size and body.min() < 0:
            bad = "".join(sequences)[int(np.argmin(body))]
            raise InternalError(f"unvalidated character {bad!r} reached the ESM tokenizer")
        ends = np.cumsum(lengths + 2)
        out = np.empty(int(ends[-1]), dtype=np.int32)
        starts = ends - lengths - 2
        out[starts] = ESM_CLS
        out[ends - 1] = ESM_EOS
        keep = np.ones(out.size, dtype=bool)
        keep[starts] = False
        keep[ends - 1] = False
        out[keep] = body
        return out, ends

