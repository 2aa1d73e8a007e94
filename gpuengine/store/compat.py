"""Whether one table of several stores means the same thing, so the stores can be merged or
read as one: the spec every store's copy of a table must share, and the refusal that names
each difference.

Specs are compared as the writer compares a run with its store (``TableSpec.differences``):
model family, weights sha256, shape, the set of outputs, store dtype, dim, ``max_residues``
and the compute precision. The model's name and the order of the outputs are not compared;
the first store's spec (the merge output's own, when it already holds the table) is kept.

**Tables without a recorded precision** (written before gpuengine recorded it) are judged as
the writer judges them: by the precisions their store's run records show (the union over the
store's runs). A table whose records show nothing is compatible with any precision. The
stores are compatible when one precision fits all of them: every recorded precision equal,
and that precision among those each old table's run records show. The combined spec records
the precision when some store records it, and stays without one otherwise (a merge does not
invent what no store recorded; the carried run records keep the evidence).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpuengine.errors import StoreMismatchError
from gpuengine.store.schema import TableSpec


@dataclass(frozen=True)
class TableCopy:
    """One store's copy of a table."""

    label: str
    """The store, as messages name it (its path)."""
    spec: TableSpec
    shown: tuple[str, ...] = ()
    """For a spec without a precision: what the store's run records show (may be empty)."""


def combined_spec(copies: list[TableCopy]) -> TableSpec:
    """The spec the stores' copies of one table share (the first copy's, with the recorded
    precision where the first has none); StoreMismatchError naming every difference."""
    first = copies[0]
    problems: list[str] = []
    for other in copies[1:]:
        diffs = first.spec.differences(other.spec, labels=(first.label, other.label))
        diffs = [d for d in diffs if not d.startswith("compute precision")]
        if diffs:
            problems.append(f"{first.label} and {other.label}: {'; '.join(diffs)}")
    precision, precision_problem = _precision(copies)
    if precision_problem:
        problems.append(precision_problem)
    if problems:
        raise StoreMismatchError(
            f"table {first.spec.name!r} does not mean the same in every store, so they cannot "
            f"be merged or read as one: {' | '.join(problems)}. {first.label} holds "
            f"{first.spec.describe()}. Leave the differing store out (or re-embed it with the "
            "same model and options)"
        )
    if first.spec.precision is None and precision is not None:
        return dataclasses.replace(first.spec, precision=precision)
    return first.spec


def _precision(copies: list[TableCopy]) -> tuple[str | None, str]:
    """(the recorded precision or None, a message when no one precision fits every copy)."""
    recorded = [(c.label, c.spec.precision) for c in copies if c.spec.precision is not None]
    shown = [(c.label, c.shown) for c in copies if c.spec.precision is None and c.shown]
    if len({p for _, p in recorded}) > 1:
        listed = ", ".join(f"{label}: {p}" for label, p in recorded)
        return None, f"compute precision differs ({listed})"
    fits = {recorded[0][1]} if recorded else None
    for _, precisions in shown:
        fits = set(precisions) if fits is None else fits & set(precisions)
    if fits is not None and not fits:
        listed = ", ".join([f"{label}: {p}" for label, p in recorded]
                           + [f"{label}: {' or '.join(p)} by its run records"
                              for label, p in shown])
        return None, f"compute precision differs ({listed})"
    return (recorded[0][1] if recorded else None), ""
