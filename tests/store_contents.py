"""What a store holds, read with lmdb itself, and the input the byte-level store tests share.

``store_contents`` reads every key and value of the tables' id and embedding databases (all
tables', or one table's), so two stores can be compared byte for byte or a store against the
bytes the one-record encoders give; ``mixed_records`` is an input with what the store's key
forms have to handle: repeats under other ids (aliases), a long id (its hashed key form) and
an id outside ASCII.
"""

from __future__ import annotations

from pathlib import Path

from conftest import random_proteins


def mixed_records(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (id, sequence) records over ``count // 3`` distinct sequences (lengths 10 to
    59); record 3 has a 600-character id, record 4 an id outside ASCII."""
    distinct = random_proteins([10 + (i * 7) % 50 for i in range(count // 3)], seed=seed)
    records = [(f"r{seed}_{i}", distinct[(i * 5) % len(distinct)]) for i in range(count)]
    records[3] = ("L" * 600 + str(seed), records[3][1])  # stored under its hashed key form
    records[4] = ("séq_ü_" + str(seed), records[4][1])
    return records


def store_contents(path: Path, table: str | None = None) -> dict[str, dict[bytes, bytes]]:
    """Every key and value of the store's ``ids:`` and ``emb:`` databases, by database name
    (only ``table``'s two when it is given)."""
    import lmdb

    from gpuengine.store.schema import emb_db_name, ids_db_name

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        out = {}
        with env.begin() as txn:
            if table is None:
                names = [bytes(k).decode() for k, _ in txn.cursor()
                         if bytes(k).startswith((b"ids:", b"emb:"))]
            else:
                names = [ids_db_name(table), emb_db_name(table)]
            for name in names:
                db = env.open_db(name.encode(), txn=txn, create=False)
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        return out
    finally:
        env.close()
