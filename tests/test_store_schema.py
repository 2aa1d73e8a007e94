"""Schema and codec of the store: validation, JSON, hashes and byte encodings."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from gpuengine.errors import StoreError
from gpuengine.store import codec
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec, recorded_precisions


def make_model(**overrides: object) -> ModelIdentity:
    fields: dict = dict(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32,
                        num_layers=6, embed_dim=8, attention_heads=4, vocab_size=33)
    fields.update(overrides)
    return ModelIdentity(**fields)


def make_spec(**overrides: object) -> TableSpec:
    fields: dict = dict(name="default", model=make_model(),
                        outputs=(OutputSpec(6, "mean"),), store_dtype="float16", dim=8,
                        max_residues=1022)
    fields.update(overrides)
    return TableSpec(**fields)


def test_fingerprint_is_blake2b_of_canonical_json_without_name() -> None:
    model = make_model()
    canonical = json.dumps(
        {"attention_heads": 4, "embed_dim": 8, "family": "esm2", "num_layers": 6,
         "sha256": "ab" * 32, "vocab_size": 33},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    assert model.fingerprint() == hashlib.blake2b(canonical, digest_size=16).digest()
    assert make_model(name="renamed").fingerprint() == model.fingerprint()
    assert make_model(num_layers=7).fingerprint() != model.fingerprint()


def test_embedding_key_matches_documented_definition() -> None:
    spec = make_spec()
    digest = codec.sequence_digest("MKV")
    assert digest == hashlib.blake2b(b"MKV", digest_size=16).digest()
    data = (spec.model.fingerprint() + struct.pack("<I", 6) + bytes([4]) + b"mean"
            + struct.pack("<Q", 1022) + digest)
    expected = hashlib.blake2b(data, digest_size=16).digest()
    assert spec.embedding_key(OutputSpec(6, "mean"), digest) == expected
    unbounded = make_spec(max_residues=None).embedding_key(OutputSpec(6, "mean"), digest)
    assert unbounded != expected
    assert spec.embedding_key(OutputSpec(6, "bos"), digest) != expected
    assert spec.embedding_key(OutputSpec(5, "mean"), digest) != expected


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (lambda: OutputSpec(6, "max"), "mean, bos, per-token"),
        (lambda: OutputSpec(-1, "mean"), "non-negative"),
        (lambda: make_spec(store_dtype="bfloat16"), "float16, float32"),
        (lambda: make_spec(name="bad name"), "[A-Za-z0-9_.-]"),
        (lambda: make_spec(outputs=()), "at least one"),
        (lambda: make_spec(outputs=(OutputSpec(6, "mean"), OutputSpec(6, "mean"))), "repeats"),
        (lambda: make_spec(outputs=(OutputSpec(7, "mean"),)), "out of range 0..6"),
        (lambda: make_spec(dim=0), "positive"),
        (lambda: make_spec(max_residues=0), "positive"),
        (lambda: make_spec(precision="fp4"), "fp32, fp16, bf16, fp8"),
        (lambda: make_model(sha256="XYZ"), "hex"),
        (lambda: make_model(family=""), "family"),
        (lambda: make_model(num_layers=True), "positive integer"),
    ],
)
def test_validation_names_the_bad_value(factory, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        factory()
    assert fragment in str(info.value)


def test_table_spec_json_round_trip_and_label() -> None:
    spec = make_spec(outputs=[OutputSpec(6, "mean"), OutputSpec(0, "per-token")])
    assert isinstance(spec.outputs, tuple)
    assert spec.outputs[1].label == "layer0/per-token"
    data = json.loads(json.dumps(spec.to_json()))
    assert TableSpec.from_json(data) == spec
    data["model_fingerprint"] = "00" * 16
    with pytest.raises(ValueError, match="fingerprint"):
        TableSpec.from_json(data)


def test_differences_are_readable() -> None:
    store = make_spec(outputs=(OutputSpec(6, "mean"), OutputSpec(6, "bos")))
    assert store.differences(make_spec(outputs=(OutputSpec(6, "bos"), OutputSpec(6, "mean")))) == []
    assert store.differences(make_spec(model=make_model(name="other name"),
                                       outputs=store.outputs)) == []
    run = make_spec(model=make_model(sha256="cd" * 32), outputs=(OutputSpec(3, "mean"),),
                    store_dtype="float32", max_residues=None)
    diffs = store.differences(run)
    assert "model weights sha256 differ (store: abababababab…, run: cdcdcdcdcdcd…)" in diffs
    assert "outputs differ (store: layer6/mean, layer6/bos, run: layer3/mean)" in diffs
    assert "store dtype differs (store: float16, run: float32)" in diffs
    assert "max_residues (truncation) differs (store: 1022, run: none)" in diffs


OLD_TABLE_RECORD = {
    "name": "default",
    "model": {"name": "esm2_t6_8M_UR50D", "family": "esm2", "sha256": "ab" * 32, "num_layers": 6,
              "embed_dim": 8, "attention_heads": 4, "vocab_size": 33},
    "model_fingerprint": make_model().fingerprint().hex(),
    "outputs": [{"layer": 6, "pool": "mean"}], "store_dtype": "float16", "dim": 8,
    "max_residues": 1022}
"""A table record as gpuengine wrote it before the compute precision was part of it."""


def test_precision_is_part_of_the_spec_and_old_records_stay_readable() -> None:
    spec = make_spec(precision="bf16")
    assert spec.to_json()["precision"] == "bf16"
    assert TableSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "computed in bf16" in spec.describe()
    old = TableSpec.from_json(OLD_TABLE_RECORD)
    assert old.precision is None and old == make_spec()
    assert old.to_json() == OLD_TABLE_RECORD  # an old record round-trips unchanged
    assert "compute precision not recorded" in old.describe()
    assert make_spec(precision="fp32").differences(spec) == [
        "compute precision differs (store: fp32, run: bf16)"]
    assert spec.differences(make_spec(precision="bf16")) == []
    assert old.differences(spec) == []  # an old record: the writer decides (run records)
    # the key names what an embedding means within a table, which holds one precision
    digest = codec.sequence_digest("MKV")
    assert spec.embedding_key(OutputSpec(6, "mean"), digest) == old.embedding_key(
        OutputSpec(6, "mean"), digest)


def test_recorded_precisions_are_those_of_engine_runs_that_committed_vectors() -> None:
    def run(precision, committed=5, command="embed"):
        return json.dumps({"run_id": "r", "committed_sequences": committed,
                           "info": {"command": command, "precision": precision}}).encode()

    assert recorded_precisions([]) == ()
    assert recorded_precisions([run("fp16"), run("fp16", committed=9)]) == ("fp16",)
    assert recorded_precisions([run("bf16"), run("fp32"), run("fp16")]) == (
        "fp32", "fp16", "bf16")
    job = json.dumps({"run_id": "job-1", "info": {"options": {"precision": "fp32"}}}).encode()
    assert recorded_precisions([run("fp16"), run("fp32", committed=0), job, b"not json",
                                run("fp32", command="other"), run(None)]) == ("fp16",)


@pytest.mark.parametrize(
    "record_id",
    ["P12345", "sp|P0|X_HUMAN", "α-β/γ", "名前🧬", "a" * 511, "a" * 512, "é" * 300, "🧬" * 200],
)
def test_id_encoding_round_trip(record_id: str) -> None:
    key = codec.encode_id(record_id)
    value = codec.encode_id_value(record_id, b"\x01" * 16)
    raw = record_id.encode("utf-8")
    assert len(key) <= 511
    if len(raw) <= 511:
        assert key == raw and value == b"\x01" * 16
    else:
        assert key[0] == 0xFF and len(key) == 17 and value[16:] == raw
    assert codec.decode_id(key, value) == record_id
    assert codec.value_digest(value) == b"\x01" * 16


def test_id_encoding_rejects_empty_and_corrupt() -> None:
    with pytest.raises(ValueError):
        codec.encode_id("")
    key = codec.encode_id("x" * 600)
    with pytest.raises(StoreError):
        codec.decode_id(key, b"\x01" * 16 + b"y" * 600)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_array_codec(dtype: str) -> None:
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal(8)
    per_token = rng.standard_normal((5, 8)).astype(np.float32)
    buf = codec.encode_array(pooled, dtype)
    out = codec.decode_array(buf, dtype, 8)
    assert out.dtype == np.dtype(dtype) and out.shape == (8,)
    np.testing.assert_array_equal(out, pooled.astype(dtype))
    out2 = codec.decode_array(memoryview(codec.encode_array(per_token, dtype)), dtype, 8,
                              per_token=True)
    assert out2.shape == (5, 8) and out2.flags.writeable
    np.testing.assert_array_equal(out2, per_token.astype(dtype))
    with pytest.raises(StoreError, match="whole number of rows"):
        codec.decode_array(buf[:-2], dtype, 8)
    with pytest.raises(StoreError):
        codec.decode_array(codec.encode_array(per_token, dtype), dtype, 8)
    with pytest.raises(ValueError):
        codec.encode_array(np.zeros((2, 2, 2)), dtype)
