"""The shared words (gpuengine/vocabulary.py): one definition of the precisions, pools, store
dtypes and table names that the configuration, the store's schema, the runner and the CLI all
check against. That nothing else defines them again is test_architecture.py's rule."""

from __future__ import annotations

import pytest
import torch

from gpuengine import vocabulary
from gpuengine.config import EmbedConfig
from gpuengine.errors import UsageError
from gpuengine.runner import DTYPES
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec


def test_every_precision_has_a_torch_dtype_of_its_byte_size():
    assert tuple(DTYPES) == vocabulary.PRECISIONS == tuple(vocabulary.PRECISION_BYTES)
    for precision, dtype in DTYPES.items():
        assert torch.empty(0, dtype=dtype).element_size() == vocabulary.PRECISION_BYTES[precision]
    assert DTYPES["fp32"] is torch.float32 and DTYPES["bf16"] is torch.bfloat16


@pytest.mark.parametrize("name", ["default", "esm", "a", "x" * 64, "run-2.fp16_a"])
def test_table_names_that_are_allowed(name):
    assert vocabulary.is_table_name(name)
    vocabulary.check_table_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "é", "tab\t", None, 3])
def test_table_names_that_are_refused_name_the_option(name):
    assert not vocabulary.is_table_name(name)
    with pytest.raises(UsageError, match="--table"):
        vocabulary.check_table_name(name)
    with pytest.raises(UsageError, match="--to"):
        vocabulary.check_table_name(name, option="--to")


def test_the_configuration_and_the_schema_accept_exactly_the_vocabulary(tmp_path):
    fasta = tmp_path / "p.fa"
    fasta.write_text(">a\nMKV\n")

    def config(**fields):
        return EmbedConfig(inputs=(fasta,), model="m", out=tmp_path / "s.lmdb", **fields)

    model = ModelIdentity(family="esm2", name="m", sha256="ab" * 32, num_layers=2, embed_dim=8,
                          attention_heads=2, vocab_size=33)

    def spec(**fields):
        return TableSpec(**{"name": "t", "model": model, "outputs": (OutputSpec(2, "mean"),),
                            "store_dtype": "float32", "dim": 8, "max_residues": None,
                            **fields})

    for precision in vocabulary.PRECISIONS:
        assert config(precision=precision).precision == precision
        assert spec(precision=precision).precision == precision
    for pool in vocabulary.POOLS:
        assert config(pools=(pool,)).pools == (pool,)
        assert OutputSpec(1, pool).pool == pool
    for dtype in vocabulary.STORE_DTYPES:
        assert config(store_dtype=dtype).store_dtype == dtype
        assert spec(store_dtype=dtype).store_dtype == dtype
    assert config().table == vocabulary.DEFAULT_TABLE
    with pytest.raises(UsageError, match="fp32, fp16, bf16"):
        config(precision="fp64")
    with pytest.raises(UsageError, match="--pool"):
        config(pools=("max",))
    with pytest.raises(UsageError):
        config(store_dtype="int8")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        spec(precision="fp64")
    with pytest.raises(ValueError, match="store_dtype must be one of float16, float32"):
        spec(store_dtype="bfloat16")


def test_timestamps_are_utc_iso_8601_with_milliseconds():
    stamp = vocabulary.utc_now()
    assert stamp.endswith("+00:00") and len(stamp.split("T")[1]) == len("12:34:56.789+00:00")
