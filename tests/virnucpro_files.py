"""VirNucPro's files as its own tools write and read them: the classifier saved the way its
training script saves it (a whole pickled module whose class lives in ``__main__``) and loaded
the way its prediction script loads it, random reads, and the prediction table read back.
Shared by the classifier, predict, daemon, table-precision and user-error tests; conftest's
``predict_models`` fixture holds one tiny model set for ``gpuengine predict``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.synthetic import write_dnabert_s, write_fair_esm_checkpoint
from gpuengine.workflows.virnucpro.classifier import FEATURE_SIZE


class MLPClassifier(nn.Module):
    """A copy of the training script's class (train.py / prediction.py), saved from ``__main__``
    by :func:`save_original_way`."""

    def __init__(self, input_dim, hidden_dim, num_class):
        super(MLPClassifier, self).__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)
        nn.init.xavier_uniform_(self.hidden_layer.weight)
        nn.init.xavier_uniform_(self.output_layer.weight)

    def forward(self, x):
        x = self.hidden_layer(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.dropout(x)
        x = self.output_layer(x)
        return x


def random_original(input_dim=FEATURE_SIZE, hidden=512, seed=0) -> MLPClassifier:
    torch.manual_seed(seed)
    model = MLPClassifier(input_dim, hidden, 2)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.2, 3.0)
        model.bn1.num_batches_tracked.fill_(1234)
        model.output_layer.weight.mul_(4.0)
    return model.eval()


def save_original_way(model: nn.Module, path) -> None:
    """``torch.save(model)`` as train.py does it: the class lives in ``__main__``."""
    main = sys.modules["__main__"]
    cls = type(model)
    saved_module = cls.__module__
    assert not hasattr(main, cls.__name__)
    cls.__module__ = "__main__"
    setattr(main, cls.__name__, cls)
    try:
        torch.save(model, path)
    finally:  # gone again: the loader must not need the class
        cls.__module__ = saved_module
        delattr(main, cls.__name__)


def load_the_original_way(path):
    """The original prediction.py: ``torch.load`` of the whole pickled module, with the training
    script's class defined in ``__main__`` (here for the duration of the call only)."""
    main = sys.modules["__main__"]
    saved = MLPClassifier.__module__
    MLPClassifier.__module__ = "__main__"
    main.MLPClassifier = MLPClassifier
    try:
        return torch.load(path, map_location="cpu", weights_only=False).eval()  # our own file
    finally:
        MLPClassifier.__module__ = saved
        del main.MLPClassifier


def reads_fasta(path, n=40, seed=5):
    rng = random.Random(seed)
    reads = []
    for i in range(n):
        length = rng.choice([150, 151, 174, 300, 501, 620, 1001, 2])
        seq = "".join(rng.choice("ACGT") for _ in range(length))
        if i % 7 == 3:  # ambiguous bases: codons dropped, frame kept
            seq = seq[:40] + "NNRY" + seq[44:]
        if i % 11 == 5:
            seq = seq.lower()
        reads.append((f"read{i}", seq))
    path.write_text("".join(f">{rid} sample\n{seq}\n" for rid, seq in reads))
    return reads


def read_predictions(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "Sequence_ID\tPrediction\tscore1\tscore2"
    rows = [line.split("\t") for line in lines[1:]]
    return ([r[0] for r in rows], [r[1] for r in rows],
            np.array([[float(r[2]), float(r[3])] for r in rows]))


class PredictModels(NamedTuple):
    """A tiny ESM-2 (d=64) and DNABERT-S (d=48) and a random classifier over both (112
    features), saved the original way."""

    esm: Path
    dna: Path
    mlp: MLPClassifier
    mlp_path: Path


def write_predict_models(root: Path) -> PredictModels:
    esm = write_fair_esm_checkpoint(root / "esm2_t2_predict.pt", 2, 64, 4, seed=21)
    dna = write_dnabert_s(root / "dnabert", num_layers=2, embed_dim=48, heads=4,
                          intermediate=96, seed=22)
    mlp = random_original(input_dim=48 + 64, hidden=32, seed=3)
    save_original_way(mlp, root / "500_model.pth")
    return PredictModels(esm, dna, mlp, root / "500_model.pth")
