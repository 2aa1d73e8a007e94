"""``merge --verify``: read every vector and id mapping of every input again and compare it
with the merged store, byte for byte.

Each input's databases are read in blocks in key order, and OUT's values of the same keys
fetched in one ``getmulti`` per block; a block that matches exactly (the common case) costs
one list comparison. A vector whose bytes differ from OUT's is still correct when OUT holds
the copy of an earlier input of the same sequence (the merge keeps the first copy), or OUT's
own copy from before the merge: the merge record counts those (``emb_differing_existing``),
and more of them than counted is a difference. Any missing vector or id, or an id mapped to
another sequence, is a difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from gpuengine.store.kway import first
from gpuengine.store.schema import TableSpec, embedding_keys_from_prefix
from gpuengine.store.sources import Snapshot
from gpuengine.store import codec

_BLOCK_BYTES = 32 << 20
_EXAMPLES = 5


@dataclass
class VerifyResult:
    """Counts of what ``--verify`` compared and found."""

    vectors: int = 0
    """Vectors of the inputs compared (one per input holding it)."""
    ids: int = 0
    """Id mappings of the inputs compared."""
    identical: int = 0
    kept_other: int = 0
    """Vectors whose bytes differ from OUT's, where OUT holds an earlier input's copy."""
    kept_existing: int = 0
    """Vectors whose bytes differ from every input's: OUT's own copy from before the merge."""
    allowed_existing: int = 0
    """How many of those the merge recorded (``emb_differing_existing``)."""
    missing_vectors: int = 0
    missing_ids: int = 0
    differing_ids: int = 0
    examples: list[str] = field(default_factory=list)
    """The first few differences, in words."""

    @property
    def differences(self) -> int:
        return (self.missing_vectors + self.missing_ids + self.differing_ids
                + max(0, self.kept_existing - self.allowed_existing))

    @property
    def ok(self) -> bool:
        return self.differences == 0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "differences": self.differences, "ok": self.ok}


def verify_merge(out: str, snaps: list[Snapshot], specs: dict[str, TableSpec],
                 counters: dict[str, dict[str, int]], progress: Any) -> VerifyResult:
    """Compare every input (``snaps``, in merge order) with the store at ``out``."""
    result = VerifyResult()
    total = sum(s.counts[t]["emb"] for t in specs for s in snaps if t in s.counts)
    progress.start("verifying", total)
    with Snapshot(out, label=f"{out} (the output)") as target:
        for table, spec in specs.items():
            result.allowed_existing += counters.get(table, {}).get("emb_differing_existing", 0)
            holders = [s for s in snaps if table in s.specs]
            for index, snap in enumerate(holders):
                _verify_vectors(result, target, snap, holders[:index], table, spec, progress)
                _verify_ids(result, target, snap, table)
    return result


def _blocks(snap: Snapshot, table: str, kind: str):
    size = max(64, int(_BLOCK_BYTES / snap.entry_bytes(table, kind)))
    with snap.cursor(table, kind) as cursor:
        items = cursor.iternext()
        while block := list(islice(items, size)):
            yield block


def _verify_vectors(result: VerifyResult, target: Snapshot, snap: Snapshot,
                    earlier: list[Snapshot], table: str, spec: TableSpec, progress: Any) -> None:
    bad: list[bytes] = []
    with target.cursor(table, "emb") as out_cursor:
        for block in _blocks(snap, table, "emb"):
            got = out_cursor.getmulti(list(map(first, block)))
            result.vectors += len(block)
            progress.advance(len(block), sum(len(v) for _, v in block))
            if got == block:
                result.identical += len(block)
                continue
            held = dict(got)
            for key, value in block:
                stored = held.get(key)
                if stored == value:
                    result.identical += 1
                elif stored is None:
                    result.missing_vectors += 1
                    bad.append(key)
                elif any(e.get(table, "emb", key) == stored for e in earlier):
                    result.kept_other += 1
                else:
                    result.kept_existing += 1
                    bad.append(key)
    if bad and len(result.examples) < _EXAMPLES:
        named = _ids_of_keys(snap, table, spec, set(bad[:_EXAMPLES]))
        for key in bad[:_EXAMPLES - len(result.examples)]:
            what = "missing from" if target.get(table, "emb", key) is None else "differs in"
            result.examples.append(
                f"table {table!r}: the vector of {named.get(key, 'an id')!r} "
                f"(embedding key {key.hex()}) of {snap.label} {what} {target.label}")


def _ids_of_keys(snap: Snapshot, table: str, spec: TableSpec,
                 keys: set[bytes]) -> dict[bytes, str]:
    """An id of ``snap`` whose sequence has each embedding key (a scan; for messages)."""
    prefixes = [spec.embedding_key_prefix(o) for o in spec.outputs]
    found: dict[bytes, str] = {}
    for block in _blocks(snap, table, "ids"):
        digests = [value[:16] for _, value in block]
        for prefix in prefixes:
            for (key, value), emb_key in zip(block, embedding_keys_from_prefix(prefix, digests)):
                if emb_key in keys and emb_key not in found:
                    found[emb_key] = codec.decode_id(key, value)
        if len(found) == len(keys):
            break
    return found


def _verify_ids(result: VerifyResult, target: Snapshot, snap: Snapshot, table: str) -> None:
    with target.cursor(table, "ids") as out_cursor:
        for block in _blocks(snap, table, "ids"):
            got = out_cursor.getmulti(list(map(first, block)))
            result.ids += len(block)
            if got == block:
                continue
            held = dict(got)
            for key, value in block:
                stored = held.get(key)
                if stored == value:
                    continue
                if stored is None:
                    result.missing_ids += 1
                else:
                    result.differing_ids += 1
                if len(result.examples) < _EXAMPLES:
                    what = "is missing from" if stored is None else "names another sequence in"
                    result.examples.append(
                        f"table {table!r}: id {codec.decode_id(key, value)!r} of {snap.label} "
                        f"{what} {target.label}")
