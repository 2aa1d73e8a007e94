"""VirNucPro's MLP classifier (spec §6): the architecture, loading the published files without
running code from them, and scoring.

Architecture (names as in the original state dict)::

    hidden_layer  Linear(input -> 512)
    bn1           BatchNorm1d(512)
                  ReLU
    dropout       Dropout(0.5)
    output_layer  Linear(512 -> 2)

Scoring is in ``eval()`` mode (BatchNorm on its running statistics, dropout off): softmax over the
two logits gives score1 = P(class 0, "others") and score2 = P(class 1, "virus"); the prediction is
``torch.max(probabilities, 1)``'s index (a tie goes to class 0, "others"), 1 -> "virus".

Files :func:`load_classifier` reads, told apart by their content, not their name:

(a) **The published ``300_model.pth`` / ``500_model.pth``**: a whole module pickled by
    ``torch.save(model)`` in the training script, so its class is ``__main__.MLPClassifier``.
    It is read with ``torch.load(weights_only=True)``: torch's restricted unpickler, which
    resolves every pickle global by its ``"module.name"`` string against an allowlist and never
    imports anything. The allowlist, given only for the duration of the call, is torch's default
    one (tensors, storages, ``collections.OrderedDict``, ``builtins.set``, ...) plus
    ``torch.nn.Linear``, ``torch.nn.BatchNorm1d``, ``torch.nn.Dropout`` and *our*
    :class:`MLPClassifier` registered under the name ``"__main__.MLPClassifier"`` (torch's
    ``safe_globals`` takes ``(object, "module.name")`` pairs). The unpickled object's tensors
    are then read straight from its ``_modules`` / ``_parameters`` / ``_buffers`` dicts (no
    ``state_dict()`` call, so no hook that a crafted file could have planted runs), and a fresh
    model is built from them. The unpickled object itself is discarded.
(b) **A plain state dict** (``torch.save(model.state_dict())``), same restricted loader.
(c) **safetensors**.

A file naming any other global fails with :class:`~gpuengine.errors.ModelLoadError` naming it,
before anything is unpickled where torch can list them statically (zip-format files), else from
torch's own refusal. :func:`convert_classifier` writes (a) or (b) out as safetensors once, so
the pickle never needs reading again.

The input size comes from the weights and must equal the feature size the caller gives
(3328 = DNABERT-S 768 + ESM-2 2560 for the real models), or loading fails naming both.
:func:`expected_length_hint` reads 300 or 500 from the file name, for the caller to warn when it
differs from the chunk length in use (scoring with the wrong model runs but changes results).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.errors import ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "FEATURE_SIZE",
    "LABELS",
    "LoadedClassifier",
    "MLPClassifier",
    "Scores",
    "convert_classifier",
    "expected_length_hint",
    "load_classifier",
    "read_classifier_state",
    "score_features",
]

FEATURE_SIZE = 768 + 2560  # DNABERT-S mean + ESM-2 3B layer-36 mean, in that order
HIDDEN_SIZE = 512
NUM_CLASSES = 2
LABELS = ("others", "virus")
ORIGINAL_CLASS = "__main__.MLPClassifier"
BN_EPS = 1e-5
STATE_KEYS = (
    "hidden_layer.weight", "hidden_layer.bias",
    "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "output_layer.weight", "output_layer.bias",
)
_SUBMODULES = {"hidden_layer": nn.Linear, "bn1": nn.BatchNorm1d,
               "output_layer": nn.Linear, "dropout": nn.Dropout}
_EPS_METADATA = "virnucpro.bn1.eps"


class MLPClassifier(nn.Module):
    """The original ``MLPClassifier(input_dim, hidden_dim, num_class)``, submodules registered in
    the original order (hidden_layer, bn1, output_layer, dropout)."""

    def __init__(self, input_dim: int = FEATURE_SIZE, hidden_dim: int = HIDDEN_SIZE,
                 num_class: int = NUM_CLASSES, bn_eps: float = BN_EPS):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim, eps=bn_eps)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hidden_layer(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.dropout(x)
        return self.output_layer(x)


@dataclass
class Scores:
    """``scores[:, 0]`` = score1 = P(others), ``scores[:, 1]`` = score2 = P(virus), float32;
    ``virus``: the prediction (argmax == 1)."""

    scores: np.ndarray
    virus: np.ndarray

    @property
    def labels(self) -> list[str]:
        return [LABELS[v] for v in self.virus.tolist()]


@dataclass
class LoadedClassifier:
    model: MLPClassifier  # in eval mode
    path: Path
    file_format: str  # "pickled-module", "state-dict" or "safetensors"
    input_dim: int
    hidden_dim: int
    expected_length: int | None  # 300 or 500 from the file name, None if it says neither

    def score(self, features, batch_size: int = 65536) -> Scores:
        return score_features(self.model, features, batch_size=batch_size)


# ----------------------------------------------------------------------------- reading


def expected_length_hint(path: str | Path) -> int | None:
    """300 or 500 when the file name holds exactly one of them as a whole number
    (``300_model.pth`` -> 300), else None."""
    found = set(re.findall(r"(?<![0-9])(300|500)(?![0-9])", Path(path).name))
    return int(found.pop()) if len(found) == 1 else None


def _allowed_globals() -> list:
    return [(MLPClassifier, ORIGINAL_CLASS), nn.Linear, nn.BatchNorm1d, nn.Dropout]


def _refused(exc_text: str) -> str | None:
    match = re.search(r"GLOBAL (\S+)", exc_text)
    return match.group(1) if match else None


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with the classifier allowlist; refused globals become a
    ModelLoadError naming them."""
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"
    with torch.serialization.safe_globals(_allowed_globals()):
        if is_zip:
            try:  # a static scan of the pickle: names every refused global, runs nothing
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 - a damaged file: let torch.load say why below
                unsafe = []
            if unsafe:
                raise ModelLoadError(
                    f"refusing to load classifier {path}: it references "
                    f"{', '.join(sorted(set(unsafe)))}, which gpuengine does not unpickle (only "
                    f"tensors, {ORIGINAL_CLASS} and the torch.nn layers it is made of are "
                    "allowed; nothing in the file was run)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
            name = _refused(str(exc))
            if name:
                raise ModelLoadError(
                    f"refusing to load classifier {path}: it references {name}, which gpuengine "
                    f"does not unpickle (only tensors, {ORIGINAL_CLASS} and the torch.nn layers "
                    "it is made of are allowed; nothing in the file was run)") from None
            reason = str(exc).split("\n\n")[0].strip()
            raise ModelLoadError(f"cannot read classifier {path}: {reason}") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8


def _module_dict(obj: object, where: str, path: Path) -> dict:
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict):
        raise ModelLoadError(f"classifier {path}: {where} has no attribute dict")
    return state


def _state_from_module(obj: MLPClassifier, path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Tensors of an unpickled original module, read from its attribute dicts (no method of the
    object is called), and bn1's eps."""
    top = _module_dict(obj, ORIGINAL_CLASS, path)
    modules = top.get("_modules")
    if not isinstance(modules, Mapping) or set(modules) != set(_SUBMODULES):
        found = sorted(modules) if isinstance(modules, Mapping) else type(modules).__name__
        raise ModelLoadError(f"classifier {path}: {ORIGINAL_CLASS} has submodules {found}, "
                             f"expected {sorted(_SUBMODULES)}")
    for own in ("_parameters", "_buffers"):
        if top.get(own):
            raise ModelLoadError(f"classifier {path}: {ORIGINAL_CLASS} has unexpected own "
                                 f"{own[1:]} {sorted(top[own])}")
    state: dict[str, torch.Tensor] = {}
    for name, kind in _SUBMODULES.items():
        sub = modules[name]
        if type(sub) is not kind:
            raise ModelLoadError(f"classifier {path}: submodule {name} is "
                                 f"{type(sub).__name__}, expected {kind.__name__}")
        attrs = _module_dict(sub, name, path)
        for group in ("_parameters", "_buffers"):
            tensors = attrs.get(group) or {}
            if not isinstance(tensors, Mapping):
                raise ModelLoadError(f"classifier {path}: {name}.{group} is not a dict")
            for key, tensor in tensors.items():
                if tensor is not None:
                    state[f"{name}.{key}"] = tensor
    if isinstance(top.get("gpuengine_synthetic"), str):
        log.warning("classifier %s has RANDOM weights (written by gpuengine's "
                    "tools/make_checkpoint.py): its predictions mean nothing", path)
    bn = _module_dict(modules["bn1"], "bn1", path)
    eps = bn.get("eps", BN_EPS)
    if not isinstance(eps, float) or not math.isfinite(eps) or eps <= 0:
        raise ModelLoadError(f"classifier {path}: bn1.eps is {eps!r}")
    if bn.get("track_running_stats", True) is not True or bn.get("affine", True) is not True:
        raise ModelLoadError(f"classifier {path}: bn1 must have affine weights and running "
                             "statistics (track_running_stats=True)")
    return state, eps


def read_classifier_state(path: str | Path) -> tuple[dict[str, torch.Tensor], float, str]:
    """(state dict, bn1 eps, file format) from any of the three file kinds, without running code
    from the file. The state dict is as found (checked by :func:`load_classifier`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"classifier file {path} not found")
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read classifier {path}: {exc}") from None
        try:
            eps = float(json.loads(metadata.get(_EPS_METADATA, "null")) or BN_EPS)
        except (TypeError, ValueError):
            raise ModelLoadError(f"classifier {path}: bad {_EPS_METADATA} metadata") from None
        return state, eps, "safetensors"
    obj = _torch_load(path)
    if isinstance(obj, MLPClassifier):
        state, eps = _state_from_module(obj, path)
        return state, eps, "pickled-module"
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise ModelLoadError(f"classifier {path}: the file holds a dict that is not a state "
                                 "dict (its values must all be tensors)")
        return dict(obj), BN_EPS, "state-dict"
    raise ModelLoadError(f"classifier {path} holds a {type(obj).__name__}, expected a pickled "
                         f"{ORIGINAL_CLASS} or a state dict")


def _check_state(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(input size, hidden size) after checking keys and shapes."""
    state = dict(state)
    missing = [k for k in STATE_KEYS if k not in state]
    extra = sorted(set(state) - set(STATE_KEYS))
    if missing or extra:
        raise ModelLoadError(f"classifier {path} is not a VirNucPro MLP: "
                             + "; ".join(part for part in (
                                 f"missing {missing}" if missing else "",
                                 f"unexpected {extra}" if extra else "") if part))
    weight = state["hidden_layer.weight"]
    if weight.dim() != 2:
        raise ModelLoadError(f"classifier {path}: hidden_layer.weight has shape "
                             f"{tuple(weight.shape)}")
    hidden, inputs = weight.shape
    expected = {
        "hidden_layer.bias": (hidden,), "bn1.weight": (hidden,), "bn1.bias": (hidden,),
        "bn1.running_mean": (hidden,), "bn1.running_var": (hidden,),
        "bn1.num_batches_tracked": (), "output_layer.weight": (NUM_CLASSES, hidden),
        "output_layer.bias": (NUM_CLASSES,),
    }
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ModelLoadError(f"classifier {path}: {key} has shape {tuple(state[key].shape)}, "
                                 f"expected {shape}")
    return int(inputs), int(hidden)


def load_classifier(path: str | Path, feature_size: int = FEATURE_SIZE,
                    device: str | torch.device = "cpu") -> LoadedClassifier:
    """The classifier in ``path`` (any of the three file kinds) as a fresh fp32
    :class:`MLPClassifier` in eval mode; refuses a classifier whose input size is not
    ``feature_size``."""
    path = Path(path)
    state, eps, file_format = read_classifier_state(path)
    if "bn1.num_batches_tracked" not in state and "bn1.running_var" in state:
        # Only counts training steps; unused in eval mode (files from torch < 0.4.1 lack it).
        state["bn1.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    inputs, hidden = _check_state(state, path)
    if inputs != feature_size:
        raise ModelLoadError(
            f"classifier {path} takes {inputs}-value feature vectors, but the features given "
            f"have {feature_size} values (VirNucPro's are {FEATURE_SIZE}: DNABERT-S 768 + "
            "ESM-2 2560); it belongs to another feature set")
    model = MLPClassifier(inputs, hidden, NUM_CLASSES, bn_eps=eps)
    state = {k: (v.detach().to(torch.long) if k.endswith("num_batches_tracked")
                 else v.detach().to(torch.float32)) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedClassifier(model=model, path=path, file_format=file_format, input_dim=inputs,
                            hidden_dim=hidden, expected_length=expected_length_hint(path))


def convert_classifier(src: str | Path, dst: str | Path) -> Path:
    """Write the classifier in ``src`` (any kind) to ``dst`` as safetensors (the keys of the
    original state dict, bn1's eps in the metadata when it is not the default)."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    state, eps, _ = read_classifier_state(src)
    _check_state(state, src)
    metadata = {_EPS_METADATA: json.dumps(eps)} if eps != BN_EPS else {}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(dst), metadata=metadata)
    return dst


# ----------------------------------------------------------------------------- scoring


MIN_CPU_ROWS = 256
"""Rows a batch is padded to (with zeros) on the CPU: below some size MKL's sgemm splits the
inner dimension between threads, so a small batch's scores changed in their last bits with the
thread count (a tail block, a score worker's fewer threads against this process's: on a 2-core
EPYC rows of a 5-row batch differed from the same rows scored alone on one thread). From 256
rows on each row's scores are the same bits whatever the batch and the threads (measured on 1
to 700 rows, 1 and 2 threads)."""


def score_features(model: MLPClassifier, features, batch_size: int = 65536) -> Scores:
    """Softmax scores and predictions of ``features`` (N, input) in eval mode, as the original
    ``predict`` computes them (fp32; batching changes nothing in eval mode but rounding, and on
    the CPU not even that: see :data:`MIN_CPU_ROWS`)."""
    param = next(model.parameters())
    inputs = model.hidden_layer.in_features
    x = torch.as_tensor(features)
    if x.dim() != 2 or x.shape[1] != inputs:
        raise ValueError(f"features have shape {tuple(x.shape)}, the classifier takes "
                         f"(N, {inputs})")
    was_training = model.training
    model.eval()
    scores, virus = [], []
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                batch = x[start:start + batch_size].to(device=param.device, dtype=torch.float32)
                rows = batch.shape[0]
                if param.device.type == "cpu" and rows < MIN_CPU_ROWS:
                    batch = torch.cat([batch, batch.new_zeros(MIN_CPU_ROWS - rows, inputs)])
                probabilities = F.softmax(model(batch), dim=1)[:rows]
                _, predicted = torch.max(probabilities, 1)  # first index on a tie: "others"
                scores.append(probabilities.cpu().numpy())
                virus.append((predicted == 1).cpu().numpy())
    finally:
        model.train(was_training)
    if not scores:
        return Scores(np.zeros((0, NUM_CLASSES), np.float32), np.zeros(0, bool))
    return Scores(np.concatenate(scores).astype(np.float32, copy=False), np.concatenate(virus))
