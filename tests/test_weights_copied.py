"""A CPU replica's weights are its own memory, not views of the checkpoint file: fp32 weights
read with ``torch.load(mmap=True)`` would otherwise change when the file is rewritten in place
while a run (or a daemon) holds the model."""

from __future__ import annotations

import os

import torch

from conftest import TINY
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.runner import place_on
from gpuengine.synthetic import write_fair_esm_checkpoint


def _model(path):
    cfg, state, _ = read_fair_esm_checkpoint(path)
    return build_esm2(cfg, state, torch.float32)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_cpu_replica_keeps_its_weights_when_the_checkpoint_is_rewritten_in_place(tmp_path):
    path = write_fair_esm_checkpoint(tmp_path / "esm2_t2_tiny.pt", *TINY, seed=3)
    placed = place_on(_model(path), torch.device("cpu"))
    unplaced = _model(path)
    before = _weights(placed)
    assert all(torch.equal(before[k], v) for k, v in _weights(unplaced).items())

    size = path.stat().st_size
    with open(path, "r+b") as f:  # same inode, same length, other bytes
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())

    # the premise: a model as the loader leaves it reads the rewritten file
    assert any(not torch.equal(before[k], v) for k, v in _weights(unplaced).items())
    after = _weights(placed)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_placing_twice_copies_once_and_replicas_share_it(tmp_path):
    path = write_fair_esm_checkpoint(tmp_path / "esm2_t2_tiny.pt", *TINY, seed=3)
    model = place_on(_model(path), torch.device("cpu"))
    pointers = [p.data_ptr() for p in model.parameters()]
    assert place_on(model, torch.device("cpu")) is model
    assert [p.data_ptr() for p in model.parameters()] == pointers
