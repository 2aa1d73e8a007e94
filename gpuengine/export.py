"""Export a store's table to the formats other tools read: NumPy ``.npz``, TSV, HDF5 (the
layout of bio_embeddings and the ProtTrans scripts) and fair-esm ``extract.py``'s per-sequence
``.pt`` files.

Every file is written under a temporary name next to its final one and renamed when complete,
so a failed export never leaves a partial file behind. Values are exported exactly as stored
(same dtype, same bits).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpuengine import __version__
from gpuengine.errors import GpuEngineError, NotInStoreError, UsageError
from gpuengine.store.reader import EmbeddingStore
from gpuengine.store.schema import OutputSpec, TableSpec

FORMATS = ("npz", "tsv", "hdf5", "fair-esm")

_CHUNK = 256
"""Records read per transaction while writing one file per record or dataset."""

FAIR_ESM_KEYS = {"per-token": "representations", "mean": "mean_representations",
                 "bos": "bos_representations"}
"""Our pooling → the key of fair-esm ``extract.py``'s result dict (``--include mean bos
per_tok``)."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    count: int
    """Records (ids) exported."""
    table: str
    outputs: tuple[str, ...]
    """Labels of the outputs written, e.g. ``("layer33/mean",)``."""


def export_store(store: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
                 table: str | None = None, layer: int | None = None,
                 pool: str | None = None) -> Exported:
    """Write every record of one table to ``output`` in format ``fmt``.

    ``npz``: ``ids`` (str), ``embeddings`` ((N, d) for pooled outputs; for per-token outputs the
    rows of all records concatenated, with ``offsets`` (N + 1) marking each record's rows),
    plus ``layer`` and ``pool``. ``tsv``: one line per vector row, the id then the values,
    each written so that it reads back exactly as stored. ``hdf5``: see :func:`_write_hdf5`.
    These three write one output (``layer``/``pool`` pick it; default the table's first).

    ``fair-esm``: a directory of ``<id>.pt`` files as fair-esm's ``scripts/extract.py`` writes
    them, holding every output of the table (or those ``layer``/``pool`` select); see
    :func:`_write_fair_esm`.

    Raises UsageError for a bad format or choice, GpuEngineError when ``output`` cannot be
    written or h5py is missing.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    output = Path(output)
    h5py = _require_h5py() if fmt == "hdf5" else None
    if fmt == "fair-esm":  # every output --layer/--pool select, not exactly one
        with EmbeddingStore(store, table=table) as emb:
            outputs = _fair_esm_outputs(emb.spec, layer, pool)
            count = _write_fair_esm(emb, outputs, output)
            return Exported(count, emb.spec.name, tuple(o.label for o in outputs))
    with EmbeddingStore(store, table=table, layer=layer, pool=pool) as emb:
        with _atomic_file(output) as partial:
            if fmt == "hdf5":
                count = _write_hdf5(h5py, emb, partial)
            else:
                count = _write_matrix(emb, partial, fmt)
        return Exported(count, emb.spec.name, (emb.output.label,))


class _atomic_file:
    """A temporary path next to ``output``, renamed to it when the block succeeds and removed
    when it fails; OSError becomes GpuEngineError naming ``output``."""

    def __init__(self, output: Path):
        self.output = output
        self.partial = output.with_name(f".{output.name}.{os.getpid()}.partial")

    def __enter__(self) -> Path:
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                os.replace(self.partial, self.output)
            elif issubclass(exc_type, OSError):
                raise GpuEngineError(f"cannot write {self.output}: {exc.strerror or exc}") from None
        except OSError as error:
            raise GpuEngineError(f"cannot write {self.output}: {error.strerror or error}") from None
        finally:
            _remove(self.partial)
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


# -- npz, tsv ---------------------------------------------------------------------------------


def _write_matrix(emb: EmbeddingStore, path: Path, fmt: str) -> int:
    ids, arrays = [], []
    for record_id, array in emb.items():
        ids.append(record_id)
        arrays.append(array)
    with open(path, "wb") as handle:
        if fmt == "npz":
            _write_npz(handle, ids, arrays, emb.output, emb.spec.dim)
        else:
            _write_tsv(handle, ids, arrays, emb.spec.dim)
    return len(ids)


def _write_npz(handle, ids: list[str], arrays: list[np.ndarray], out: OutputSpec, dim: int) -> None:
    if out.per_token:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
        matrix = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
        extra = {"offsets": offsets}
    else:
        matrix = np.stack(arrays) if arrays else np.zeros((0, dim), np.float32)
        extra = {}
    # A file object, not a name: given a name without ".npz", numpy would append it.
    np.savez(handle, ids=np.array(ids, dtype=str), embeddings=matrix, layer=out.layer,
             pool=out.pool, **extra)


def _write_tsv(handle, ids: list[str], arrays: list[np.ndarray], dim: int) -> None:
    for record_id, array in zip(ids, arrays):
        for row in array.reshape(-1, dim):
            # str of a numpy scalar: the shortest text that reads back as the stored value
            line = record_id + "\t" + "\t".join(map(str, row)) + "\n"
            handle.write(line.encode("utf-8"))


# -- HDF5 -------------------------------------------------------------------------------------


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise GpuEngineError("--format hdf5 needs the h5py package: pip install "
                             "'gpuengine[hdf5]' (or pip install h5py)") from None
    return h5py


def hdf5_names(ids: list[str]) -> dict[str, str]:
    """Dataset name of every id: the id itself where HDF5 allows it; ``/`` (a group separator
    in HDF5) becomes ``_`` and the names ``.``/``..`` become ``_``/``__``, as the ProtTrans
    scripts do, with ``_2``, ``_3``… added where that would collide with another name. The
    exact id is always in the dataset's ``original_id`` attribute."""
    taken = {rid for rid in ids if _valid_hdf5_name(rid)}
    names = {}
    for rid in ids:
        if _valid_hdf5_name(rid):
            names[rid] = rid
            continue
        base = rid.replace("/", "_") if rid not in (".", "..") else rid.replace(".", "_")
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names[rid] = name
    return names


def _valid_hdf5_name(name: str) -> bool:
    return "/" not in name and name not in (".", "..")


def _write_hdf5(h5py: Any, emb: EmbeddingStore, path: Path) -> int:
    """One dataset per record at the file's root, named by :func:`hdf5_names`, holding the
    stored array ((d,) pooled, (residues, d) per-token) in the stored dtype, with attributes
    ``original_id`` (the exact id, as bio_embeddings writes it), ``model``, ``layer`` and
    ``pool``. The root's attributes say where the file comes from (model, sha256, table,
    output, dtype, gpuengine version)."""
    spec, out = emb.spec, emb.output
    ids = list(emb.ids())  # the records now; ones a running writer adds meanwhile wait
    names = hdf5_names(ids)
    with h5py.File(path, "w") as f:
        f.attrs.update(_provenance(spec, out))
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for record_id, array in zip(chunk, _arrays(emb, chunk)):
                dataset = f.create_dataset(names[record_id], data=array)
                dataset.attrs.update({"original_id": record_id, "model": spec.model.name,
                                      "layer": out.layer, "pool": out.pool})
    return len(ids)


def _provenance(spec: TableSpec, out: OutputSpec) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "model": spec.model.name, "model_family": spec.model.family,
        "model_sha256": spec.model.sha256, "table": spec.name, "layer": out.layer,
        "pool": out.pool, "store_dtype": spec.store_dtype, "dim": spec.dim,
        "gpuengine_version": __version__}
    if spec.max_residues is not None:
        attrs["max_residues"] = spec.max_residues
    return attrs


# -- fair-esm ---------------------------------------------------------------------------------


def _fair_esm_outputs(spec: TableSpec, layer: int | None, pool: str | None) -> list[OutputSpec]:
    """The outputs a fair-esm export writes: all of the table's, or those --layer/--pool pick."""
    wanted = layer + spec.model.num_layers + 1 if layer is not None and layer < 0 else layer
    outputs = [o for o in spec.outputs
               if (wanted is None or o.layer == wanted) and (pool is None or o.pool == pool)]
    if not outputs:
        asked = " ".join(([] if layer is None else [f"--layer {layer}"])
                         + ([] if pool is None else [f"--pool {pool}"]))
        raise NotInStoreError(f"table {spec.name!r} stores no output for {asked}; choices: "
                              f"{', '.join(o.label for o in spec.outputs)}")
    return outputs


def _fair_esm_path(directory: Path, record_id: str) -> Path:
    """``<directory>/<id>.pt`` as extract.py names it (an id with ``/`` lands in a
    subdirectory, as there); an id that would leave ``directory`` is refused."""
    parts = record_id.split("/")
    if record_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise GpuEngineError(f"record id {record_id!r} cannot be a file name inside the output "
                             "directory (fair-esm's <id>.pt); export it with --format hdf5 or npz")
    return directory.joinpath(*parts[:-1], parts[-1] + ".pt")


def _write_fair_esm(emb: EmbeddingStore, outputs: list[OutputSpec], output: Path) -> int:
    """One ``<id>.pt`` per record, each ``torch.save`` of ``{"label": id,
    "mean_representations": {layer: tensor (d,)}, "bos_representations": {...},
    "representations": {layer: tensor (residues, d)}}`` with the keys of the stored poolings,
    layers as ints, tensors in the stored dtype: what ``extract.py --include mean bos
    per_tok`` writes, so ``torch.load(path, weights_only=True)`` reads it.

    A new ``output`` is filled under a temporary name and renamed when complete; into an
    existing directory each file is written under a temporary name and renamed (files of
    other ids are left alone, as extract.py does)."""
    ids = list(emb.ids())
    for record_id in ids:
        _fair_esm_path(output, record_id)  # refuse before writing anything
    if output.exists() and not output.is_dir():
        raise GpuEngineError(f"cannot write {output}: not a directory (--format fair-esm "
                             "writes a directory of <id>.pt files)")
    if output.is_dir():
        return _fill_fair_esm(emb, outputs, output, ids)
    with _atomic_file(output) as partial:
        partial.mkdir()
        count = _fill_fair_esm(emb, outputs, partial, ids)
    return count


def _fill_fair_esm(emb: EmbeddingStore, outputs: list[OutputSpec], directory: Path,
                   ids: list[str]) -> int:
    import torch

    present = {FAIR_ESM_KEYS[o.pool] for o in outputs}
    keys = [key for key in FAIR_ESM_KEYS.values() if key in present]
    views = {o: EmbeddingStore(emb.path, table=emb.spec.name, layer=o.layer, pool=o.pool)
             for o in outputs}
    try:
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            arrays = {o: _arrays(view, chunk) for o, view in views.items()}
            for i, record_id in enumerate(chunk):
                result: dict[str, Any] = {"label": record_id}
                for key in keys:  # extract.py's order: per-token, mean, bos
                    result[key] = {o.layer: torch.from_numpy(arrays[o][i])
                                   for o in outputs if FAIR_ESM_KEYS[o.pool] == key}
                path = _fair_esm_path(directory, record_id)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise GpuEngineError(f"cannot write {path}: {exc.strerror or exc}") from None
                with _atomic_file(path) as partial:
                    torch.save(result, partial)
    finally:
        for view in views.values():
            view.close()
    return len(ids)


def _arrays(view: EmbeddingStore, ids: list[str]) -> list[np.ndarray]:
    many = view.get_many(ids)
    return list(many) if isinstance(many, list) else [row.copy() for row in many]
