"""Where model weights come from: a checkpoint file, a Hugging Face directory, or a name.

:func:`resolve` turns what the user typed into a :class:`ModelSource` without reading weights:

1. an existing file → a fair-esm checkpoint (``esm2_*.pt``);
2. an existing directory with ``config.json`` → a Hugging Face directory (family from its
   ``model_type``: ``esm`` → ESM-2; ``bert`` with ``tokenizer.json`` and fused ``Wqkv``
   weights → DNABERT-S);
3. a published ESM-2 name (``esm2_t6_8M_UR50D`` … ``esm2_t48_15B_UR50D``) → the torch-hub cache
   (``$TORCH_HOME/hub/checkpoints/<name>.pt``), downloaded there when online. Offline, the error
   says exactly where to put the file;
4. ``zhihan1996/DNABERT-S`` → its snapshot in the local Hugging Face cache
   (``$HF_HOME/hub/models--zhihan1996--DNABERT-S/snapshots/<rev>/``); never downloaded.

:func:`weights_checksum` gives the sha256 that identifies the weights in a store's meta record;
it is cached per (path, size, mtime) so a 6 GB checkpoint is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from gpuengine.errors import ModelLoadError
from gpuengine.synthetic import ESM2_SHAPES

log = logging.getLogger(__name__)

ESM_DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
DNABERT_HUB_NAMES = ("zhihan1996/DNABERT-S",)
"""Hub names resolved from the local Hugging Face cache only (never downloaded, no remote code)."""


@dataclass(frozen=True)
class ModelSource:
    family: str
    """Registry key: ``esm2`` or ``dnabert-s``."""
    format: str
    """``fair-esm`` (a .pt file) or ``hf`` (a directory)."""
    path: Path
    name: str
    """Human name: the published name, or the file stem / directory name."""

    def weight_files(self) -> list[Path]:
        if self.format == "fair-esm":
            return [self.path]
        names = ("model.safetensors", "pytorch_model.bin")
        files = [p for p in sorted(self.path.iterdir())
                 if p.name in names or (p.suffix in (".safetensors", ".bin") and "-of-" in p.name)]
        return files


def hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(spec: str, *, allow_download: bool) -> ModelSource:
    """Find the weights ``spec`` names (see module docstring)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return ModelSource("esm2", "fair-esm", path, path.stem)
    if path.is_dir():
        return _resolve_directory(path)
    if spec in ESM2_SHAPES:
        return ModelSource("esm2", "fair-esm", _hub_checkpoint(spec, allow_download), spec)
    if spec in DNABERT_HUB_NAMES:
        return replace(_resolve_directory(_hf_cache_snapshot(spec)), name=spec)
    known = ", ".join((*ESM2_SHAPES, *DNABERT_HUB_NAMES))
    raise ModelLoadError(f"model {spec!r} is not a file, a model directory or a known name "
                         f"(known names: {known})")


def _resolve_directory(path: Path) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"model directory {path} has no config.json (expected a Hugging "
                             "Face model directory)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from None
    if model_type == "esm":
        return ModelSource("esm2", "hf", path, path.name)
    if model_type == "bert":
        from gpuengine.models.dnabert_s_weights import is_dnabert_s_directory

        if is_dnabert_s_directory(path):
            return ModelSource("dnabert-s", "hf", path, path.name)
        raise ModelLoadError(f"{path}: a 'bert' model, but not DNABERT-S (DNABERT-S needs "
                             "tokenizer.json and fused attention.self.Wqkv weights)")
    raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported "
                         "(supported: 'esm' for ESM-2, 'bert' for DNABERT-S)")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), as
    ``huggingface_hub`` resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cache_snapshot(name: str) -> Path:
    """The cached snapshot of hub model ``name``: the one ``refs/main`` names, else the only
    (or newest) one. Never downloads."""
    repo = hf_hub_cache() / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.glob("*") if (p / "config.json").is_file()),
                   key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if found:
        return found[-1]
    raise ModelLoadError(
        f"{name} is not in the local Hugging Face cache ({repo}); gpuengine does not download it. "
        f"On a machine with internet access run `hf download {name}` (or "
        f"`huggingface-cli download {name}`) and copy its cache folder to {repo}, or pass the "
        "model directory itself (config.json, tokenizer.json and pytorch_model.bin or "
        "model.safetensors): --model /path/to/DNABERT-S")


def _hub_checkpoint(name: str, allow_download: bool) -> Path:
    target = hub_checkpoint_dir() / f"{name}.pt"
    if target.exists():
        return target
    url = ESM_DOWNLOAD_URL.format(name=name)
    hint = (f"download {url} on a machine with internet access and copy it to {target} "
            f"(or pass the file itself: --model /path/to/{name}.pt)")
    if not allow_download:
        raise ModelLoadError(f"{name} is not in the torch-hub cache ({target}) and downloads are "
                             f"off; {hint}")
    import torch.hub

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, ...
        raise ModelLoadError(f"{name} is not in the torch-hub cache ({target}) and could not be "
                             f"downloaded ({exc.__class__.__name__}: {exc}); {hint}") from None
    return target


def weights_checksum(source: ModelSource, cache_dir: Path) -> str:
    """sha256 over the weight files (names and bytes), cached by (path, size, mtime_ns)."""
    files = source.weight_files()
    if not files:
        raise ModelLoadError(f"{source.path}: no weight files found")
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache_key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    cache_file = cache_dir / "checksums.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if cache_key in cache:
        return cache[cache_key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            while chunk := handle.read(16 << 20):
                digest.update(chunk)
    value = digest.hexdigest()
    cache[cache_key] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        log.debug("could not write checksum cache %s", cache_file)
    return value

