"""What a store holds: the model identity, the outputs of a table, and the LMDB layout.

Everything here is plain data: frozen dataclasses that validate themselves on construction,
their JSON form (the records under ``meta``), the hash that names an embedding inside a table
(:meth:`TableSpec.embedding_key`), and the names of the LMDB databases. ``docs/store.md``
describes the same layout for people who read a store without gpuengine.
"""

from __future__ import annotations

import functools

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from typing import Any

from gpuengine.errors import StoreError
from gpuengine.vocabulary import POOLS, PRECISIONS, STORE_DTYPES, is_table_name

SCHEMA_VERSION = 1
"""Version of the on-disk layout. A store with a newer version is refused."""

RUN_STATUSES = ("running", "complete", "partial", "interrupted", "failed")

MAX_TABLES = 31
"""Each table takes two LMDB databases; with ``meta`` and ``runs`` that fills ``max_dbs=64``."""

META_DB = "meta"
RUNS_DB = "runs"
STORE_KEY = b"store"
TABLE_KEY_PREFIX = b"table:"

_FAMILY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def ids_db_name(table: str) -> str:
    """Name of the LMDB database that maps record ids of ``table`` to sequence digests."""
    return f"ids:{table}"


def emb_db_name(table: str) -> str:
    """Name of the LMDB database that holds the arrays of ``table``."""
    return f"emb:{table}"


def table_key(table: str) -> bytes:
    """Key of the table's :class:`TableSpec` record in the ``meta`` database."""
    return TABLE_KEY_PREFIX + table.encode("ascii")


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only (the input of hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def blake2b16(data: bytes) -> bytes:
    """The store's hash: blake2b with a 16-byte digest (sequence digests, keys, fingerprints)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def embedding_key_from_prefix(prefix: bytes, seq_digest: bytes) -> bytes:
    """:meth:`TableSpec.embedding_key` given its :meth:`~TableSpec.embedding_key_prefix`."""
    return blake2b16(prefix + bytes(seq_digest))


def embedding_keys_from_prefix(prefix: bytes, seq_digests: Sequence[bytes]) -> list[bytes]:
    """:func:`embedding_key_from_prefix` of many digests (bytes), in one loop."""
    from gpuengine.store.codec import embedding_keys  # codec imports this module

    return embedding_keys(prefix, seq_digests)


def _positive_int(owner: str, field_name: str, value: object, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        wanted = "a non-negative integer" if zero_ok else "a positive integer"
        raise ValueError(f"{owner}.{field_name} must be {wanted}, got {value!r}")


def _choice(owner: str, field_name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}.{field_name} must be one of {', '.join(allowed)}; got {value!r}"
        )


def _short_hex(value: str) -> str:
    return value[:12] + "…" if len(value) > 12 else value


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced the embeddings. ``name`` is informative only."""

    family: str
    """Model family, e.g. ``esm2`` or ``dnabert-s`` (lower-case ``[a-z0-9_.-]``)."""
    name: str
    """Human name, e.g. ``esm2_t33_650M_UR50D``; not part of :meth:`fingerprint`."""
    sha256: str
    """Lower-case hex SHA-256 of the weights."""
    num_layers: int
    embed_dim: int
    attention_heads: int
    vocab_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not _FAMILY.fullmatch(self.family):
            raise ValueError(
                f"ModelIdentity.family must match [a-z0-9][a-z0-9_.-]* (e.g. esm2, dnabert-s); "
                f"got {self.family!r}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelIdentity.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(
                f"ModelIdentity.sha256 must be 64 lower-case hex digits, got {self.sha256!r}"
            )
        for field_name in ("num_layers", "embed_dim", "attention_heads", "vocab_size"):
            _positive_int("ModelIdentity", field_name, getattr(self, field_name))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that define the model (everything except ``name``)."""
        return {
            "family": self.family,
            "sha256": self.sha256,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "attention_heads": self.attention_heads,
            "vocab_size": self.vocab_size,
        }

    def fingerprint(self) -> bytes:
        """blake2b-16 of :func:`canonical_json` of :meth:`fingerprint_fields`."""
        return blake2b16(canonical_json(self.fingerprint_fields()))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.fingerprint_fields()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(
            family=data["family"],
            name=data["name"],
            sha256=data["sha256"],
            num_layers=data["num_layers"],
            embed_dim=data["embed_dim"],
            attention_heads=data["attention_heads"],
            vocab_size=data["vocab_size"],
        )


@dataclass(frozen=True)
class OutputSpec:
    """One stored output: a resolved layer index and a pooling."""

    layer: int
    """0 is the embedding layer, ``num_layers`` the last transformer layer."""
    pool: str
    """One of :data:`POOLS`."""

    def __post_init__(self) -> None:
        _positive_int("OutputSpec", "layer", self.layer, zero_ok=True)
        _choice("OutputSpec", "pool", self.pool, POOLS)

    @property
    def label(self) -> str:
        """E.g. ``layer33/mean``."""
        return f"layer{self.layer}/{self.pool}"

    @property
    def per_token(self) -> bool:
        """Whether the stored array is 2-D ``(residues, dim)``."""
        return self.pool == "per-token"

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "pool": self.pool}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputSpec:
        return cls(layer=data["layer"], pool=data["pool"])


def _labels(outputs: tuple[OutputSpec, ...]) -> str:
    return ", ".join(o.label for o in outputs)


@dataclass(frozen=True)
class TableSpec:
    """What the embeddings of one table mean. A store refuses a run whose spec differs."""

    name: str
    model: ModelIdentity
    outputs: tuple[OutputSpec, ...]
    """Non-empty, no repeats; the first one is the default output of lookups."""
    store_dtype: str
    dim: int
    max_residues: int | None
    """Truncation applied before embedding; ``None`` means none."""
    precision: str | None = None
    """Compute precision of the model forward (one of :data:`PRECISIONS`): fp16 or bf16
    vectors differ from fp32 ones far beyond fp32's tolerance, so a table holds one. ``None``
    only in a record written before gpuengine recorded it; the writer then decides from the
    store's run records and records it at the next run (docs/store.md)."""

    def __post_init__(self) -> None:
        if not is_table_name(self.name):
            raise ValueError(
                f"table name must be 1-64 characters of [A-Za-z0-9_.-], got {self.name!r}"
            )
        if not isinstance(self.model, ModelIdentity):
            raise ValueError(f"TableSpec.model must be a ModelIdentity, got {self.model!r}")
        object.__setattr__(self, "outputs", tuple(self.outputs))
        self._check_outputs()
        _choice("TableSpec", "store_dtype", self.store_dtype, STORE_DTYPES)
        _positive_int("TableSpec", "dim", self.dim)
        if self.max_residues is not None:
            _positive_int("TableSpec", "max_residues", self.max_residues)
        if self.precision is not None:
            _choice("TableSpec", "precision", self.precision, PRECISIONS)

    def _check_outputs(self) -> None:
        if not self.outputs:
            raise ValueError("TableSpec.outputs must name at least one output")
        for output in self.outputs:
            if not isinstance(output, OutputSpec):
                raise ValueError(f"TableSpec.outputs must hold OutputSpec values, got {output!r}")
            if output.layer > self.model.num_layers:
                raise ValueError(
                    f"output {output.label}: layer {output.layer} is out of range "
                    f"0..{self.model.num_layers} for {self.model.name}"
                )
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"TableSpec.outputs repeats an output: {_labels(self.outputs)}")

    def to_json(self) -> dict[str, Any]:
        """The JSON record stored under ``meta`` / ``table:<name>`` (without ``precision``
        when it is unknown: an old record round-trips unchanged)."""
        record = {
            "name": self.name,
            "model": self.model.to_json(),
            "model_fingerprint": self.model.fingerprint().hex(),
            "outputs": [o.to_json() for o in self.outputs],
            "store_dtype": self.store_dtype,
            "dim": self.dim,
            "max_residues": self.max_residues,
        }
        if self.precision is not None:
            record["precision"] = self.precision
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableSpec:
        """Inverse of :meth:`to_json`; raises ValueError/KeyError/TypeError on a bad record."""
        spec = cls(
            name=data["name"],
            model=ModelIdentity.from_json(data["model"]),
            outputs=tuple(OutputSpec.from_json(o) for o in data["outputs"]),
            store_dtype=data["store_dtype"],
            dim=data["dim"],
            max_residues=data.get("max_residues"),
            precision=data.get("precision"),
        )
        stored = data.get("model_fingerprint")
        if stored is not None and stored != spec.model.fingerprint().hex():
            raise ValueError(f"table {spec.name!r}: model_fingerprint does not match the model")
        return spec

    def describe(self) -> str:
        """One line for messages: model, outputs, dtype, dim, truncation, precision."""
        residues = "none" if self.max_residues is None else str(self.max_residues)
        computed = ("compute precision not recorded" if self.precision is None
                    else f"computed in {self.precision}")
        return (
            f"{self.model.name} ({self.model.family}, sha256 {_short_hex(self.model.sha256)}), "
            f"outputs {_labels(self.outputs)}, {self.store_dtype}, dim {self.dim}, "
            f"max_residues {residues}, {computed}"
        )

    def differences(self, other: TableSpec,
                    labels: tuple[str, str] = ("store", "run")) -> list[str]:
        """Human-readable differences (``self`` is the store's spec, ``other`` the run's;
        ``labels`` name the two sides in the messages, e.g. two stores being merged).

        An empty list means compatible. The model's ``name`` and the order of ``outputs``
        are not compared (the order only picks the default output of lookups; the stored
        order stays). ``precision`` is compared when both record it; a stored spec without
        it (an old record) is the writer's to decide, from the store's run records.
        """
        diffs: list[str] = []
        a, b = labels

        def differ(what: str, mine: object, theirs: object, plural: bool = False) -> None:
            if mine != theirs:
                verb = "differ" if plural else "differs"
                diffs.append(f"{what} {verb} ({a}: {mine}, {b}: {theirs})")

        differ("table name", self.name, other.name)
        differ("model family", self.model.family, other.model.family)
        if self.model.sha256 != other.model.sha256:
            mine, theirs = _short_hex(self.model.sha256), _short_hex(other.model.sha256)
            if mine == theirs:
                mine, theirs = self.model.sha256, other.model.sha256
            differ("model weights sha256", mine, theirs, plural=True)
        for field_name in ("num_layers", "embed_dim", "attention_heads", "vocab_size"):
            differ(f"model {field_name}", getattr(self.model, field_name),
                   getattr(other.model, field_name))
        if set(self.outputs) != set(other.outputs):
            diffs.append(
                f"outputs differ ({a}: {_labels(self.outputs)}, {b}: {_labels(other.outputs)})"
            )
        differ("store dtype", self.store_dtype, other.store_dtype)
        differ("dim", self.dim, other.dim)
        differ("max_residues (truncation)", self.max_residues or "none",
               other.max_residues or "none")
        if self.precision is not None and other.precision is not None:
            differ("compute precision", self.precision, other.precision)
        return diffs

    def embedding_key(self, output: OutputSpec, seq_digest: bytes) -> bytes:
        """Key of one array in ``emb:<table>``; deterministic across processes and versions.

        ``blake2b(digest_size=16)`` over the concatenation of::

            model fingerprint        16 bytes  (ModelIdentity.fingerprint())
            layer                    4 bytes   unsigned little-endian
            len(pool)                1 byte
            pool                     ASCII, e.g. b"mean"
            max_residues             8 bytes   unsigned little-endian, 0 for None
            sequence digest          16 bytes  (codec.sequence_digest)
        """
        if len(seq_digest) != 16:
            raise ValueError(f"a sequence digest is 16 bytes, got {len(seq_digest)}")
        return embedding_key_from_prefix(self.embedding_key_prefix(output), seq_digest)

    def embedding_key_prefix(self, output: OutputSpec) -> bytes:
        """What :meth:`embedding_key` hashes before the sequence digest (for callers that
        compute many keys: ``blake2b(prefix + digest, digest_size=16)``)."""
        return _key_prefix(self.model, output.layer, output.pool, self.max_residues or 0)


@functools.lru_cache(maxsize=256)
def _key_prefix(model: ModelIdentity, layer: int, pool: str, max_residues: int) -> bytes:
    """Everything of an embedding key but the sequence digest (computed once per output)."""
    pool_bytes = pool.encode("ascii")
    return b"".join((model.fingerprint(), struct.pack("<I", layer),
                     struct.pack("<B", len(pool_bytes)), pool_bytes,
                     struct.pack("<Q", max_residues)))


def recorded_precisions(run_records: Iterable[bytes]) -> tuple[str, ...]:
    """The compute precisions of the engine runs among ``run_records`` (raw values of the
    ``runs`` database) that committed vectors, in :data:`PRECISIONS` order: what a table whose
    record predates ``TableSpec.precision`` can be shown to hold. Every engine run since the
    first release records its precision (``info.precision``, ``info.command == "embed"``);
    runs are not tied to a table, so in a store of several tables this is the union over all.
    Empty when nothing shows it (e.g. a store written through the writer API alone)."""
    found = set()
    for raw in run_records:
        try:
            record = json.loads(bytes(raw))
        except ValueError:
            continue
        info = record.get("info") if isinstance(record, dict) else None
        if (isinstance(info, dict) and info.get("command") == "embed"
                and info.get("precision") in PRECISIONS
                and isinstance(record.get("committed_sequences"), int)
                and record["committed_sequences"] > 0):
            found.add(info["precision"])
    return tuple(p for p in PRECISIONS if p in found)


def parse_store_record(raw: bytes | None, path: str) -> dict[str, Any]:
    """Decode and check the ``meta``/``store`` record; StoreError if absent, corrupt or newer."""
    if raw is None:
        raise StoreError(
            f"{path} is not a gpuengine store (no 'store' record in its meta database)"
        )
    try:
        record = json.loads(bytes(raw))
        version = record["schema_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"store {path}: the 'store' record is corrupt ({exc})") from exc
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(f"store {path}: invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}, newer than this gpuengine supports "
            f"({SCHEMA_VERSION}); it was written by gpuengine {record.get('engine_version', '?')}. "
            "Upgrade gpuengine to read or extend it."
        )
    if not isinstance(record.get("tables"), list):
        raise StoreError(f"store {path}: the 'store' record has no table list")
    return record


def parse_table_record(raw: bytes | None, table: str, path: str) -> TableSpec:
    """Decode the ``table:<name>`` record; StoreError if absent or corrupt."""
    if raw is None:
        raise StoreError(f"store {path}: table {table!r} is listed but has no table record")
    try:
        return TableSpec.from_json(json.loads(bytes(raw)))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"store {path}: the record of table {table!r} is corrupt ({exc})") from exc
