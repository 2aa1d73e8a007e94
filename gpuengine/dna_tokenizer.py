"""DNA sequences to DNABERT-S token ids, with the model's own BPE ``tokenizer.json``.

The file is read with ``tokenizers.Tokenizer.from_file`` (no ``transformers``, no remote code).
The hub file embeds ``padding: Fixed 2000`` and ``truncation: 2000``; loaded this way both would
stay active (every encoding padded to, and cut at, 2000 tokens), so both are switched off right
after loading: a sequence becomes ``[CLS] + BPE pieces + [SEP]`` of its own length, however
long (packing needs real lengths; the engine never truncates DNA unless asked).
``[CLS]``/``[SEP]`` come from the file's ``TemplateProcessing`` post-processor, as the authors'
``tokenizer(seq)`` adds them.

Characters (:data:`DNA_ALPHABET`, what validation accepts):

* ``A C G T`` — the bases the vocabulary is built from.
* ``N`` and the IUPAC ambiguity codes ``R Y S W K M B D H V`` — accepted. The vocabulary has no
  token for them and the BPE model has no normaliser, ``fuse_unk`` off and no byte fallback, so
  each such character becomes one ``[UNK]`` (id 0) and BPE merges never span it: "ACGNT" is
  ``[CLS]``, the pieces of "ACG", ``[UNK]``, the pieces of "T", ``[SEP]``; "NN" is two
  ``[UNK]``. This is what the authors' tokenizer gives such input (pinned by
  ``tests/test_dnabert_s.py`` on the synthetic tokenizer, which has the hub file's settings; on
  the hub file itself it is not yet checked, see the DNABERT-S reference §9).
* Anything else (``U``, gaps ``-``/``.``, ``*``, digits, whitespace) is rejected by validation:
  the raw tokenizer would turn ``U`` into ``[UNK]`` silently and would split words at
  punctuation, changing the merges around it.
* Lower case: the FASTA reader upper-cases every sequence, and :meth:`DnaTokenizer.encode`
  upper-cases again, so ``acgt`` encodes as ``ACGT``. (The raw tokenizer has no normaliser and
  would give one ``[UNK]`` per lower-case letter.)

``max_residues`` (none by default for DNA) cuts the sequence in bases before tokenizing.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpuengine.errors import InternalError, ModelLoadError

DNA_BASES = "ACGT"
DNA_AMBIGUITY = "NRYSWKMBDHV"
DNA_ALPHABET = frozenset(DNA_BASES + DNA_AMBIGUITY)
"""Characters a DNA sequence may hold (upper case): bases, N and IUPAC ambiguity codes."""

DNABERT_SPECIALS = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4}
DNABERT_UNK, DNABERT_CLS, DNABERT_SEP = 0, 1, 2

_VALID = str.maketrans("", "", "".join(DNA_ALPHABET))


class DnaTokenizer:
    """DNA string → ``[CLS] … [SEP]`` ids (int32) with DNABERT-S's BPE."""

    family = "dnabert-s"
    alphabet = DNA_ALPHABET
    specials_per_sequence = 2

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception
            raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
        tok.no_padding()
        tok.no_truncation()
        expected = {"[CLS]": DNABERT_CLS, "[SEP]": DNABERT_SEP, "[UNK]": DNABERT_UNK}
        found = {name: tok.token_to_id(name) for name in expected}
        if found != expected:
            raise ModelLoadError(f"{path}: special tokens are {found}, DNABERT-S uses {expected}")
        ids = tok.encode("A", add_special_tokens=True).ids
        if len(ids) != 3 or ids[0] != DNABERT_CLS or ids[-1] != DNABERT_SEP:
            raise ModelLoadError(f"{path}: encoding 'A' gives {ids}; expected [CLS] … [SEP] "
                                 "from a TemplateProcessing post-processor")
        self.path = path
        self.vocab_size = tok.get_vocab_size()
        self._tok = tok
        self._bpe = tok.model if _plain_bpe(json.loads(tok.to_str())) else None

    @classmethod
    def from_directory(cls, directory: str | Path) -> DnaTokenizer:
        file = Path(directory) / "tokenizer.json"
        if not file.exists():
            raise ModelLoadError(f"{directory} has no tokenizer.json (DNABERT-S needs its BPE "
                                 "tokenizer file beside the weights)")
        return cls(file)

    def _prepare(self, sequence: str, max_residues: int | None) -> str:
        if max_residues is not None:
            sequence = sequence[:max_residues]
        sequence = sequence.upper()
        bad = sequence.translate(_VALID)
        if bad:
            raise InternalError(f"unvalidated character {bad[0]!r} reached the DNA tokenizer")
        return sequence

    def encode(self, sequence: str, max_residues: int | None = None) -> np.ndarray:
        """Token ids (int32) with [CLS] and [SEP]; bases beyond ``max_residues`` dropped first."""
        ids = self._tok.encode(self._prepare(sequence, max_residues)).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, sequences: Sequence[str],
                     max_residues: int | None = None) -> list[np.ndarray]:
        """:meth:`encode` for many sequences at once (the Rust tokenizer's threads; without
        the character offsets, which nothing here reads, where the installed tokenizers has
        ``encode_batch_fast``)."""
        prepared = [self._prepare(s, max_residues) for s in sequences]
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int32) for e in encode(prepared)]

    def encode_flat(self, sequences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence's ids one after the other (int32) and where each one's ids end
        (int64, cumulative): :meth:`encode` of each, without an array per sequence.

        Where the file's pipeline adds nothing to a word of letters (no normaliser, a
        whitespace pre-tokenizer, a plain BPE model, ``[CLS] $A [SEP]``), the BPE model
        tokenizes each validated sequence directly: the same ids as the whole pipeline
        (``tests/test_dnabert_s.py`` compares them) at about half its cost per sequence,
        on this thread (the caller runs one tokenizer per input process)."""
        if self._bpe is None:
            ids = self.encode_batch(list(sequences))
            ends = np.cumsum(np.fromiter((t.size for t in ids), np.int64, len(ids)))
            flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
            return flat.astype(np.int32, copy=False), ends
        joined = "".join(sequences).upper()
        if joined.translate(_VALID):
            bad = joined.translate(_VALID)[0]
            raise InternalError(f"unvalidated character {bad!r} reached the DNA tokenizer")
        tokenize, token_id = self._bpe.tokenize, _TOKEN_ID
        flat: list[int] = []
        extend, append = flat.extend, flat.append
        ends = np.empty(len(sequences), np.int64)
        for i, seq in enumerate(sequences):
            append(DNABERT_CLS)
            extend(map(token_id, tokenize(seq.upper())))
            append(DNABERT_SEP)
            ends[i] = len(flat)
        return np.array(flat, dtype=np.int32), ends


_TOKEN_ID = operator.attrgetter("id")


def _plain_bpe(spec: dict) -> bool:
    """Whether ``tokenizer.json`` turns a word of letters into ``[CLS]``, the BPE model's
    pieces of the word, ``[SEP]``, and nothing else (so the model may be asked directly)."""
    model, pre, post = spec.get("model") or {}, spec.get("pre_tokenizer"), spec.get("post_processor")
    pres = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    single = [next(iter(piece.values())).get("id") for piece in (post or {}).get("single", [])]
    return (model.get("type") == "BPE" and model.get("dropout") in (None, 0.0)
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and spec.get("normalizer") is None
            and all(p is None or p.get("type") in ("Whitespace", "WhitespaceSplit") for p in pres)
            and (post or {}).get("type") == "TemplateProcessing"
            and single == ["[CLS]", "A", "[SEP]"])
