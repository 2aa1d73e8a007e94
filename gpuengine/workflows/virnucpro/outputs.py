"""VirNucPro's output files (spec §7, §8), byte for byte, and a per-read summary.

``prediction_results.txt`` (:class:`PredictionWriter`), one row per kept frame, streamed::

    Sequence_ID<TAB>Prediction<TAB>score1<TAB>score2

``Prediction`` is ``virus`` or ``others``; the scores are ``str()`` of numpy float32 (the shortest
text that reads back as the same float32, e.g. ``0.12345679``, ``1e-05``, ``1.0``), as the
original's ``'\\t'.join(map(str, probability))`` over a float32 numpy row (not ``format()``,
which prints float32 0.1 as ``0.10000000149011612``; numpy prints 1e-4 as ``1e-04``). Rows are
written in the order they are given (the original's order is not meaningful either). Scores
that are NaN or infinite are refused (ValueError): they mean broken features, and a silent
``nan`` row would turn into a wrong consensus call.

``prediction_results_highestscore.csv`` (:class:`ConsensusCollector`), **tab-separated despite
the name**, one row per chunk with at least one kept frame::

    Modified_ID<TAB>Is_Virus

``Modified_ID`` is the frame id minus its last two characters (the chunk id: grouping is per
chunk, never per read); ``Is_Virus`` is ``True`` when max(score2) >= max(score1) over the chunk's
frames (the two maxima taken separately; a tie is virus), else ``False``. Rows are sorted by
``Modified_ID`` in plain code-point order: what pandas' ``groupby`` (sort=True) gives for string
keys, object or string dtype, and what Python's ``sorted`` gives. The file is written with
Python's csv module (tab delimiter, minimal quoting, ``\\n``), as pandas' ``to_csv`` writes it,
so even an id holding a ``"`` comes out the same.

The original reads its own ``prediction_results.txt`` back with pandas to get there; here the
maxima are kept from the float32 scores themselves. That gives the same answer: each printed
score reads back (as float64) to exactly its float32 value, so maxima and the comparison are
unchanged. (Not reproduced: pandas would mis-read an id starting with ``"`` as a quoted field.)

``prediction_results_reads.tsv`` (new; :meth:`ConsensusCollector.write_read_summary`), one row
per input read, in the order the reads were registered (input order), tab-separated::

    Read_ID<TAB>Chunks<TAB>Scored_Chunks<TAB>Virus_Chunks<TAB>Max_Virus_Score<TAB>Call

- ``Chunks``: how many chunks the read was cut into (0 for an empty record).
- ``Scored_Chunks``: chunks with at least one stop-free frame (the ones in the consensus file).
- ``Virus_Chunks``: of those, chunks whose ``Is_Virus`` is ``True``.
- ``Max_Virus_Score``: the highest score2 over all frames of the read (float32 ``str()`` like
  above), ``NA`` when no frame was scored.
- ``Call``: ``virus`` if at least one chunk is called virus, ``others`` if chunks were scored but
  none is virus, ``unscored`` if no frame of the read survived translation (no stop-free frame,
  or an empty record).

For reads up to the chunk length (one chunk each) a read's ``Call`` is its chunk's ``Is_Virus``.
For longer reads the original has no per-read answer; "any chunk" is the rule given here, and
the counts let a user apply another (e.g. a majority).

Memory: :class:`PredictionWriter` holds nothing. :class:`ConsensusCollector` keeps, in memory,
one dict entry per scored chunk (its id, mapped to a slot in two float32 arrays holding the two
maxima) and one per registered read (id and chunk count): measured at about 240 bytes for a read
and its one chunk with 40-character ids, i.e. about 1.4 GB for 6 M short reads. The consensus and summary files
are written at the end, because a chunk's frames can arrive in any order (the embedding stages
reorder work by length).
"""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CONSENSUS_FILE",
    "PREDICTIONS_FILE",
    "READ_SUMMARY_FILE",
    "ConsensusCollector",
    "PredictionWriter",
    "format_prediction_rows",
    "format_score",
]

PREDICTIONS_FILE = "prediction_results.txt"
CONSENSUS_FILE = "prediction_results_highestscore.csv"
READ_SUMMARY_FILE = "prediction_results_reads.tsv"

PREDICTIONS_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
CONSENSUS_HEADER = ("Modified_ID", "Is_Virus")
READ_SUMMARY_HEADER = ("Read_ID", "Chunks", "Scored_Chunks", "Virus_Chunks", "Max_Virus_Score",
                       "Call")
_FRAME_SUFFIXES = frozenset(("F1", "F2", "F3", "R1", "R2", "R3"))
_CHUNK_MARK = "_chunk_"


def format_score(value) -> str:
    """A score as the original prints it: ``str()`` of a numpy float32."""
    return str(np.float32(value))


def _scores_array(scores, n: int) -> np.ndarray:
    array_ = np.asarray(scores)
    if array_.shape != (n, 2):
        raise ValueError(f"scores have shape {array_.shape}, expected ({n}, 2)")
    if array_.dtype != np.float32:
        array_ = array_.astype(np.float32)
    if not np.isfinite(array_).all():
        raise ValueError("scores contain NaN or infinity (the features were broken)")
    return array_


def format_prediction_rows(frame_ids: Sequence[str], scores,
                           virus: Iterable[bool] | None = None) -> str:
    """The lines of ``prediction_results.txt`` for these frames (see :class:`PredictionWriter`):
    ``scores`` is (N, 2) [score1, score2]; ``virus`` the predictions (default: score2 > score1,
    the original's argmax, a tie being "others")."""
    scores = _scores_array(scores, len(frame_ids))
    if virus is None:
        virus = scores[:, 1] > scores[:, 0]
    virus = np.asarray(virus, dtype=bool)
    if virus.shape != (len(frame_ids),):
        raise ValueError(f"{virus.shape[0] if virus.ndim else 1} predictions for "
                         f"{len(frame_ids)} frames")
    label = ("others", "virus")
    # str(), not format(): f"{np.float32(0.1)}" is '0.10000000149011612', str() is '0.1'.
    return "".join(
        f"{fid}\t{label[v]}\t{s1}\t{s2}\n"
        for fid, v, s1, s2 in zip(frame_ids, virus.tolist(), map(str, scores[:, 0]),
                                  map(str, scores[:, 1])))


class PredictionWriter:
    """Streams ``prediction_results.txt``: the header at open, rows as they come."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = 0
        self._handle = open(self.path, "w", encoding="utf-8", newline="\n")
        self._handle.write(PREDICTIONS_HEADER)

    def write(self, frame_ids: Sequence[str], scores, virus: Iterable[bool] | None = None) -> None:
        """Append one row per frame. ``scores`` is (N, 2) [score1, score2]; ``virus`` the
        predictions (default: score2 > score1, the original's argmax, a tie being "others")."""
        self.write_rows(format_prediction_rows(frame_ids, scores, virus), len(frame_ids))

    def write_rows(self, rows: str, count: int) -> None:
        """Append ``count`` rows already formatted by :func:`format_prediction_rows`."""
        self._handle.write(rows)
        self.rows += count

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConsensusCollector:
    """Per-chunk maxima of score1 and score2, and the reads they belong to; writes the consensus
    file and the per-read summary at the end (see the module docstring for memory)."""

    def __init__(self) -> None:
        self._read_slot: dict[str, int] = {}
        self._read_ids: list[str] = []
        self._read_chunks = array("l")
        self._chunk_slot: dict[str, int] = {}
        self._max1 = array("f")
        self._max2 = array("f")

    # -- input

    def add_read(self, read_id: str, n_chunks: int) -> None:
        """Register a read (in input order) with the number of chunks it was cut into."""
        if read_id in self._read_slot:
            raise ValueError(f"read {read_id!r} registered twice")
        self._read_slot[read_id] = len(self._read_ids)
        self._read_ids.append(read_id)
        self._read_chunks.append(int(n_chunks))

    def add_reads(self, read_ids: Sequence[str], chunks_per_read: Sequence[int]) -> None:
        """:meth:`add_read` for a batch (``Frames.chunks_per_read`` of the same batch)."""
        if len(read_ids) != len(chunks_per_read):
            raise ValueError(f"{len(read_ids)} reads but {len(chunks_per_read)} chunk counts")
        counts = np.asarray(chunks_per_read).tolist()
        start = len(self._read_ids)
        slots = dict(zip(read_ids, range(start, start + len(read_ids))))
        if len(slots) == len(read_ids) and self._read_slot.keys().isdisjoint(slots):
            self._read_slot.update(slots)  # the whole batch at once: no id seen twice
            self._read_ids.extend(read_ids)
            self._read_chunks.extend(int(c) for c in counts)
            return
        for read_id, n_chunks in zip(read_ids, counts):  # one by one, to name the repeated id
            self.add_read(read_id, n_chunks)

    def add_frames(self, frame_ids: Sequence[str], scores) -> None:
        """Fold the scores of some frames into their chunks' maxima (any order, any batching)."""
        scores = _scores_array(scores, len(frame_ids))
        slots = self._chunk_slot
        max1, max2 = self._max1, self._max2
        for fid, s1, s2 in zip(frame_ids, scores[:, 0].tolist(), scores[:, 1].tolist()):
            if fid[-2:] not in _FRAME_SUFFIXES:
                raise ValueError(f"{fid!r} is not a frame id (it does not end in F1..R3)")
            chunk = fid[:-2]  # the original's Modified_ID = Sequence_ID[:-2]
            slot = slots.get(chunk)
            if slot is None:
                slots[chunk] = len(max1)
                max1.append(s1)
                max2.append(s2)
            else:
                if s1 > max1[slot]:
                    max1[slot] = s1
                if s2 > max2[slot]:
                    max2[slot] = s2

    # -- results

    def chunk_calls(self) -> list[tuple[str, bool]]:
        """(Modified_ID, Is_Virus) of every scored chunk, sorted by id."""
        max1, max2 = self._max1, self._max2
        return [(chunk, max2[slot] >= max1[slot])
                for chunk, slot in sorted(self._chunk_slot.items())]

    def write_consensus(self, path: str | Path) -> int:
        """Write ``prediction_results_highestscore.csv``; returns the number of rows."""
        calls = self.chunk_calls()
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n",
                                quoting=csv.QUOTE_MINIMAL)
            writer.writerow(CONSENSUS_HEADER)
            writer.writerows(calls)
        return len(calls)

    def _read_counts(self) -> tuple[list[int], list[int], list[float]]:
        """Per registered read: scored chunks, virus chunks, highest score2 (-inf: none)."""
        n = len(self._read_ids)
        scored = [0] * n
        virus = [0] * n
        best = [-math.inf] * n
        unknown = []
        max1, max2 = self._max1, self._max2
        read_slot = self._read_slot.get
        for chunk, slot in self._chunk_slot.items():
            read = read_slot(chunk.rpartition(_CHUNK_MARK)[0])
            if read is None:
                unknown.append(chunk)
                continue
            scored[read] += 1
            if max2[slot] >= max1[slot]:
                virus[read] += 1
            if max2[slot] > best[read]:
                best[read] = max2[slot]
        if unknown:
            raise ValueError(f"{len(unknown)} scored chunks belong to no registered read, e.g. "
                             f"{sorted(unknown)[:3]}")
        return scored, virus, best

    def read_rows(self) -> list[tuple[str, int, int, int, str, str]]:
        """The per-read summary rows, in registration order."""
        scored, virus, best = self._read_counts()
        rows = []
        for i, read_id in enumerate(self._read_ids):
            if scored[i] == 0:
                rows.append((read_id, self._read_chunks[i], 0, 0, "NA", "unscored"))
            else:
                rows.append((read_id, self._read_chunks[i], scored[i], virus[i],
                             format_score(best[i]), "virus" if virus[i] else "others"))
        return rows

    def write_read_summary(self, path: str | Path) -> int:
        """Write the per-read summary (:meth:`read_rows`, tab-separated, built line by line
        without the row tuples); returns the number of rows."""
        scored, virus, best = self._read_counts()
        # str() of each numpy float32 maximum, as format_score, for the scored reads at once
        texts = iter(map(str, np.array([b for b, s in zip(best, scored) if s], np.float32)))
        chunks = self._read_chunks
        lines = []
        for i, read_id in enumerate(self._read_ids):
            if scored[i] == 0:
                lines.append(f"{read_id}\t{chunks[i]}\t0\t0\tNA\tunscored\n")
            else:
                lines.append(f"{read_id}\t{chunks[i]}\t{scored[i]}\t{virus[i]}\t{next(texts)}\t"
                             f"{'virus' if virus[i] else 'others'}\n")
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.write("\t".join(READ_SUMMARY_HEADER) + "\n")
            handle.write("".join(lines))
        return len(lines)
