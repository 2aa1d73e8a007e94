"""VirNucPro's MLP classifier: the three file kinds, refusal of anything but weights, scoring."""

from __future__ import annotations

import builtins
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.errors import ModelLoadError
from virnucpro_files import random_original, save_original_way
from gpuengine.workflows.virnucpro.classifier import (
    FEATURE_SIZE,
    MLPClassifier as OurMLP,
    STATE_KEYS,
    convert_classifier,
    expected_length_hint,
    load_classifier,
    read_classifier_state,
    score_features,
)


@pytest.fixture(scope="module")
def original():
    return random_original()


@pytest.fixture(scope="module")
def features():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(300, FEATURE_SIZE, generator=gen)


def reference_scores(model, features):
    """The original ``predict``: eval, softmax, torch.max."""
    model.eval()
    with torch.no_grad():
        probabilities = F.softmax(model(features), dim=1)
        _, predicted = torch.max(probabilities.data, 1)
    return probabilities.numpy(), predicted.numpy() == 1


def test_pickled_original_module_loads_and_scores_like_the_original(tmp_path, original, features):
    path = tmp_path / "500_model.pth"
    save_original_way(original, path)
    # The published layout: the pickle names the training script's class, not importable now.
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == {
        "__main__.MLPClassifier", "torch.nn.modules.linear.Linear",
        "torch.nn.modules.batchnorm.BatchNorm1d", "torch.nn.modules.dropout.Dropout"}
    assert "MLPClassifier" not in vars(sys.modules["__main__"])
    loaded = load_classifier(path)
    assert loaded.file_format == "pickled-module"
    assert type(loaded.model) is OurMLP
    assert (loaded.input_dim, loaded.hidden_dim, loaded.expected_length) == (FEATURE_SIZE, 512, 500)
    assert not loaded.model.training
    assert list(loaded.model.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    want, want_virus = reference_scores(original, features)
    got = loaded.score(features)
    assert got.scores.dtype == np.float32 and got.scores.shape == (300, 2)
    assert np.abs(got.scores - want).max() <= 1e-6
    assert (got.virus == want_virus).all()
    assert 0 < got.virus.sum() < 300  # both classes occur, so the test means something
    assert got.labels == ["virus" if v else "others" for v in want_virus]


def test_state_dict_and_safetensors_files(tmp_path, original, features):
    plain = tmp_path / "300_model_state.pt"
    torch.save(original.state_dict(), plain)
    pickled = tmp_path / "300_model.pth"
    save_original_way(original, pickled)
    converted = convert_classifier(pickled, tmp_path / "300_model.safetensors")
    want, _ = reference_scores(original, features)
    for path, kind in ((plain, "state-dict"), (converted, "safetensors")):
        loaded = load_classifier(path)
        assert loaded.file_format == kind
        assert loaded.expected_length == 300
        assert np.abs(loaded.score(features).scores - want).max() <= 1e-6
    state, eps, kind = read_classifier_state(converted)
    assert kind == "safetensors" and eps == 1e-5 and sorted(state) == sorted(STATE_KEYS)


def test_non_default_bn_eps_is_carried(tmp_path, features):
    model = random_original(input_dim=64, hidden=16, seed=3)
    model.bn1.eps = 1e-3
    path = tmp_path / "model.pth"
    save_original_way(model, path)
    small = features[:, :64]
    want, _ = reference_scores(model, small)
    loaded = load_classifier(path, feature_size=64)
    assert loaded.model.bn1.eps == 1e-3 and loaded.expected_length is None
    assert np.abs(loaded.score(small).scores - want).max() <= 1e-6
    converted = load_classifier(convert_classifier(path, tmp_path / "m.safetensors"),
                                feature_size=64)
    assert converted.model.bn1.eps == 1e-3


def test_feature_size_mismatch_is_refused_naming_both_sizes(tmp_path):
    path = tmp_path / "500_model.pth"
    save_original_way(random_original(input_dim=1024, hidden=32), path)
    with pytest.raises(ModelLoadError, match=r"takes 1024-value .* have 3328 values"):
        load_classifier(path)
    assert load_classifier(path, feature_size=1024).input_dim == 1024


def test_expected_length_hint():
    assert expected_length_hint("/m/300_model.pth") == 300
    assert expected_length_hint("500_model.pth") == 500
    assert expected_length_hint("virnucpro-500.safetensors") == 500
    assert expected_length_hint("model.pth") is None
    assert expected_length_hint("1500_model.pth") is None
    assert expected_length_hint("300_vs_500.pth") is None
    assert expected_length_hint("/300/model.pth") is None  # the file name only


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickles_are_refused_and_not_run(tmp_path, legacy, original):
    marker = tmp_path / "pwned"
    state = dict(original.state_dict())
    cases = {
        "posix.system": {**state, "hidden_layer.weight": _System(f"touch {marker}")},
        "builtins.eval": {**state, "x": _Eval(f"open({str(marker)!r}, 'w')")},
    }
    for name, payload in cases.items():
        path = tmp_path / f"evil_{name}.pth"
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ModelLoadError) as info:
            load_classifier(path)
        assert name.split(".")[-1] in str(info.value), str(info.value)
        if not legacy:
            assert name in str(info.value)
        assert not marker.exists()


def test_other_classes_in_a_pickled_module_are_refused(tmp_path):
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden_layer = nn.Linear(4, 2)
            self.act = nn.ReLU()

    Sneaky.__qualname__ = "Sneaky"
    save_original_way(Sneaky(), tmp_path / "m.pth")
    with pytest.raises(ModelLoadError, match=r"__main__\.Sneaky.*torch\.nn\.modules\.activation"
                                             r"\.ReLU|torch\.nn\.modules\.activation\.ReLU.*"
                                             r"__main__\.Sneaky"):
        load_classifier(tmp_path / "m.pth")


def test_wrong_contents_are_refused(tmp_path, original):
    state = dict(original.state_dict())
    path = tmp_path / "m.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("output")}, path)
    with pytest.raises(ModelLoadError, match="missing"):
        load_classifier(path)
    torch.save({**state, "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_classifier(path)
    torch.save({**state, "output_layer.weight": torch.zeros(3, 512)}, path)
    with pytest.raises(ModelLoadError, match="output_layer.weight has shape"):
        load_classifier(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="holds a list"):
        load_classifier(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="cannot read classifier"):
        load_classifier(tmp_path / "junk.pth")
    with pytest.raises(ModelLoadError, match="not found"):
        load_classifier(tmp_path / "absent.pth")


def test_score_features_checks_shape_and_batches(original, features):
    model = OurMLP()
    model.load_state_dict(original.state_dict())
    want, want_virus = reference_scores(original, features)
    got = score_features(model, features.numpy(), batch_size=7)
    # Other batch shapes take other matmul kernels: equal up to rounding only.
    assert np.abs(got.scores - want).max() <= 1e-5 and (got.virus == want_virus).all()
    assert model.training  # restored
    with pytest.raises(ValueError, match=r"\(N, 3328\)"):
        score_features(model, features[:, :100])
    empty = score_features(model, torch.zeros(0, FEATURE_SIZE))
    assert empty.scores.shape == (0, 2) and empty.virus.shape == (0,)


def test_tie_goes_to_others():
    model = OurMLP(4, 2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    got = score_features(model, torch.ones(3, 4))
    assert (got.scores == 0.5).all() and not got.virus.any()


def test_cpu_scores_are_the_same_bits_whatever_the_batch_and_the_threads(original, features):
    """Predictions must not depend on how reads fall into blocks or how many threads a score
    worker has: every row scores to the same bits alone, in small batches, all at once, on
    one thread or two (the 2-core EPYC of this test's first failure gave a 5-row batch
    other last bits on two threads than on one)."""
    model = OurMLP()
    model.load_state_dict(original.state_dict())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = score_features(model, features)
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for batch_size in (1, 5, 7, 300):
                got = score_features(model, features, batch_size=batch_size)
                np.testing.assert_array_equal(got.scores, want.scores)
                np.testing.assert_array_equal(got.virus, want.virus)
            for start, stop in ((0, 1), (3, 8), (290, 300)):
                np.testing.assert_array_equal(score_features(model, features[start:stop]).scores,
                                              want.scores[start:stop])
    finally:
        torch.set_num_threads(threads)
