"""DNABERT-S: packed forward against an independent line-by-line reading of the authors'
``bert_layers.py`` (fp32, CPU), loader rules, tokenizer behaviour, ALiBi slopes, registry.

The reference (dnabert_s_reference.py) imports nothing from ``gpuengine``: it reads the
safetensors file and config.json itself and runs the padded architecture as the original code
does (−10000 key padding bias, ALiBi table, divide by √head_dim, fp32). Tolerance: max |ours −
ref| ≤ 1e-5.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, embed_in_batches
from dnabert_s_reference import raw_tokenizer, reference_embeddings, reference_slopes
from gpuengine.packing import WorkItem
from gpuengine.pooling import PoolingRule
from gpuengine.runner import Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import OutputSpec
from gpuengine.synthetic import write_dnabert_s

# head_dim 16; 6 heads: the non-power-of-two ALiBi slope branch runs end to end
TINY = {"num_layers": 2, "embed_dim": 96, "heads": 6, "intermediate": 128, "vocab": 128}
POOLS = ("mean", "bos", "per-token")
# bp lengths; with ~4-5 bp per token these span 3 … ~700 tokens (more than tenfold within a batch)
LENGTHS = [1, 2, 7, 30, 151, 500, 1200, 3000]


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dna_dir(tmp_path_factory) -> Path:
    return write_dnabert_s(tmp_path_factory.mktemp("w") / "dnabert_tiny", **TINY, seed=7)


@pytest.fixture(scope="module")
def dna_dir_mlm(tmp_path_factory) -> Path:
    """The same weights as ``dna_dir`` saved as a BertForMaskedLM (``bert.`` + ``cls.*``)."""
    return write_dnabert_s(tmp_path_factory.mktemp("w") / "dnabert_tiny_mlm", **TINY, seed=7,
                           with_bert_prefix=True)


def random_dna(lengths, seed=0, alphabet="ACGT") -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- ours through the runner ---------------------------------------------------------------------------
def load_ours(directory: Path, dtype=torch.float32):
    from gpuengine.models.dnabert_s_weights import build_dnabert_s, read_dnabert_s

    cfg, state, synthetic = read_dnabert_s(directory)
    assert synthetic
    return build_dnabert_s(cfg, state, dtype)


def embed_with_runner(model, directory, sequences, outputs, budget=2048, attention=None,
                      device="cpu", precision="fp32", kernels=None):
    from gpuengine.dna_tokenizer import DnaTokenizer

    tok = DnaTokenizer.from_directory(directory)
    items = [WorkItem(sequence_digest(s), tok.encode(s), len(s)) for s in sequences]
    runner = Runner(model, torch.device(device), precision, outputs, PoolingRule(0, 0),
                    compile=kernels is not None, kernels=kernels)
    assert runner.kernels == (kernels if device == "cuda" and kernels else "eager")
    if attention is not None:
        runner.attention, runner.padded = attention, attention.needs_padding
    return embed_in_batches(runner, items, outputs, budget)


def compare(ours, ref, outputs, what):
    for o in outputs:
        if o.pool == "per-token":
            for i, (a, b) in enumerate(zip(ours[o], ref[o.layer]["per-token"], strict=True)):
                assert_close(a, b, f"{what} {o.label} seq {i}")
        else:
            assert_close(np.stack(ours[o]), np.stack(ref[o.layer][o.pool]), f"{what} {o.label}")


# -- parity ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_packed_matches_reference_one_sequence_at_a_time(dna_dir):
    sequences = random_dna(LENGTHS, seed=1) + ["ACGTNNNNACGTRYKMSWBDHVACGT", "acgtacgtnacgt"]
    layers = [0, 1, 2]
    outputs = [OutputSpec(layer, pool) for layer in layers for pool in POOLS]
    ours = embed_with_runner(load_ours(dna_dir), dna_dir, sequences, outputs)
    ref = reference_embeddings(dna_dir, sequences, layers, batched=False)
    compare(ours, ref, outputs, "vs batch=1")


def test_packed_matches_padded_reference_batch_with_mask(dna_dir):
    """One padded batch with the original −10000 key bias; lengths differ more than tenfold."""
    sequences = random_dna([40, 600, 2500, 9, 1300], seed=2)
    outputs = [OutputSpec(2, pool) for pool in POOLS]
    ours = embed_with_runner(load_ours(dna_dir), dna_dir, sequences, outputs, budget=8192)
    ref = reference_embeddings(dna_dir, sequences, [2], batched=True)
    compare(ours, ref, outputs, "vs padded batch")
    tokens = [len(raw_tokenizer(dna_dir).encode(s).ids) for s in sequences]
    assert max(tokens) >= 10 * min(tokens[:3]), tokens


@pytest.mark.slow
def test_batch_composition_does_not_change_results(dna_dir):
    model = load_ours(dna_dir)
    seqs = random_dna([50, 800, 120, 2000, 5], seed=3)
    out = [OutputSpec(2, "mean")]
    packed = np.stack(embed_with_runner(model, dna_dir, seqs, out, budget=8192)[out[0]])
    alone = np.stack([embed_with_runner(model, dna_dir, [s], out)[out[0]][0] for s in seqs])
    assert_close(packed, alone, "packed vs alone")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_model_with_flex_attention_matches_the_reference(dna_dir):
    """The whole model on the flex path (uncompiled on the CPU): q, k and v are projected into
    a buffer already padded to the flex row bucket, zero beyond the real rows."""
    from gpuengine.models.dnabert_s import FlexAlibiAttention
    from gpuengine.models.flex import flex_available, flex_bucket

    if not flex_available():
        pytest.skip("torch without FlexAttention")
    sequences = random_dna([40, 600, 9, 300, 151], seed=8)
    outputs = [OutputSpec(2, pool) for pool in POOLS]
    tokens = sum(len(raw_tokenizer(dna_dir).encode(s).ids) for s in sequences)
    assert flex_bucket(tokens) > tokens  # the padded-buffer branch runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = embed_with_runner(load_ours(dna_dir), dna_dir, sequences, outputs, budget=8192,
                                 attention=FlexAlibiAttention(compiled=False))
    ref = reference_embeddings(dna_dir, sequences, [2], batched=False)
    compare(ours, ref, outputs, "flex model vs reference")


def test_explicit_alibi_attention_equals_substituted_one(dna_dir):
    """The runner's default (ESM) attention is replaced by the ALiBi one; passing it directly
    gives the same numbers, and a layout built without padding indices works too."""
    from gpuengine.models.dnabert_s import AlibiPaddedAttention

    model = load_ours(dna_dir)
    seqs = random_dna([80, 300, 12], seed=4)
    out = [OutputSpec(1, "mean"), OutputSpec(2, "per-token")]
    a = embed_with_runner(model, dna_dir, seqs, out)
    b = embed_with_runner(model, dna_dir, seqs, out, attention=AlibiPaddedAttention())
    for o in out:
        for x, y in zip(a[o], b[o], strict=True):
            assert np.array_equal(x, y)

    class Unpadded(AlibiPaddedAttention):
        needs_padding = False  # the runner then builds a layout without pad_index / key_mask

    c = embed_with_runner(model, dna_dir, seqs, out, attention=Unpadded())
    for o in out:
        for x, y in zip(a[o], c[o], strict=True):
            assert np.array_equal(x, y)


def test_layer_zero_only_runs_no_layer(dna_dir):
    model = load_ours(dna_dir)
    seqs = random_dna([30], seed=5)
    ours = embed_with_runner(model, dna_dir, seqs, [OutputSpec(0, "mean")])
    ref = reference_embeddings(dna_dir, seqs, [0], batched=False)
    assert_close(ours[OutputSpec(0, "mean")][0], ref[0]["mean"][0], "embeddings")


# -- attention implementations ---------------------------------------------------------------------------
def _layout(lengths, padded=True):
    from gpuengine.models.attention import PackedLayout

    lens = torch.tensor(lengths, dtype=torch.int64)
    return PackedLayout.build(lens, int(lens.sum()), int(lens.max()), padded=padded)


def _dense_alibi_reference(q, k, v, lengths):
    heads, dim = q.shape[1], q.shape[2]
    slopes = torch.tensor(reference_slopes(heads))
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        dist = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
        s = qs @ ks.transpose(1, 2) / math.sqrt(dim) - slopes[:, None, None] * dist
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def test_padded_alibi_attention_matches_dense_per_sequence():
    from gpuengine.models.dnabert_s import AlibiPaddedAttention

    lengths = [3, 130, 1, 257, 40]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 12, 16, generator=gen) for _ in range(3))
    ours = AlibiPaddedAttention()(q, k, v, _layout(lengths))
    assert_close(ours.numpy(), _dense_alibi_reference(q, k, v, lengths).numpy(), "padded alibi")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("block", [pytest.param(128, marks=pytest.mark.slow), 64])
def test_flex_mask_and_bias_match_padded_eager_cpu(block):
    """The flex path's score_mod, document mask and block mask, run uncompiled on the CPU."""
    from gpuengine.models.dnabert_s import (
        AlibiPaddedAttention,
        FlexAlibiAttention,
        flex_available,
    )

    if not flex_available():
        pytest.skip("torch without FlexAttention")
    lengths = [3, 130, 1, 257, 40, 129]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = FlexAlibiAttention(compiled=False, block=block)(q, k, v, _layout(lengths, padded=False))
    padded = AlibiPaddedAttention()(q, k, v, _layout(lengths))
    assert_close(flex.numpy(), padded.numpy(), "flex (eager) vs padded")


@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("lengths", [[1], [128], [127, 1, 300], [5] * 60, [1000, 3, 129, 256]])
def test_document_block_mask_covers_exactly_the_needed_blocks(lengths, block):
    from gpuengine.models.flex import document_block_mask, flex_available, flex_bucket

    if not flex_available():
        pytest.skip("torch without FlexAttention")
    total = sum(lengths)
    padded = flex_bucket(total, block)
    assert padded % block == 0 and total <= padded < 2 * total + block
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    mask = document_block_mask(cu, total, padded, lambda b, h, q, kv: q >= 0, block)
    assert mask.BLOCK_SIZE == (block, block)
    nblocks = padded // block
    counts = mask.kv_num_blocks[0, 0].tolist()
    indices = mask.kv_indices[0, 0].tolist()
    visited = {(i, j) for i in range(nblocks) for j in indices[i][: counts[i]]}
    doc = np.repeat(np.arange(len(lengths)), lengths)
    needed = set()
    for i in range(nblocks):
        rows = doc[i * block: (i + 1) * block]
        for d in np.unique(rows):
            first, last = np.flatnonzero(doc == d)[[0, -1]]
            needed |= {(i, j) for j in range(first // block, last // block + 1)}
    assert needed <= visited
    assert all(i * block < total for i, _ in visited), "a block of padding rows visits keys"
    # contiguous ranges only: nothing beyond the first/last sequence of each query block
    assert len(visited) == len(needed)


def test_attention_selection():
    from gpuengine.models.dnabert_s import (
        AlibiPaddedAttention,
        FlexAlibiAttention,
        flex_available,
        select_alibi_attention,
    )

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert isinstance(select_alibi_attention(cpu, dtype), AlibiPaddedAttention)
    assert isinstance(select_alibi_attention("cuda", torch.float32), AlibiPaddedAttention)
    if flex_available():
        flex = select_alibi_attention(cpu, torch.float32, "flex")
        assert isinstance(flex, FlexAlibiAttention) and not flex.compiled
    with pytest.raises(ValueError, match="unknown ALiBi attention kind"):
        select_alibi_attention(cpu, torch.float32, "varlen")


def test_flex_bucket_is_coarse():
    from gpuengine.models.flex import FLEX_BLOCK, flex_bucket

    buckets = {flex_bucket(t) for t in range(1, (1 << 16) + 1, 37)}
    assert buckets == {FLEX_BLOCK << k for k in range((1 << 16).bit_length() - FLEX_BLOCK.bit_length() + 1)}
    assert all(t <= flex_bucket(t) < 2 * t + FLEX_BLOCK and flex_bucket(t) % FLEX_BLOCK == 0
               for t in range(1, 5000))


# -- ALiBi slopes ------------------------------------------------------------------------------------------
def test_alibi_slopes_reproduce_the_published_table():
    from gpuengine.models.dnabert_s import alibi_slope_tensor, alibi_slopes

    exponents = [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]
    table = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
             0.7071068, 0.3535534, 0.1767767, 0.0883883]
    slopes = alibi_slopes(12)
    assert slopes == pytest.approx([2.0 ** e for e in exponents], rel=1e-15)
    assert slopes == pytest.approx(table, abs=5e-8)
    ours = alibi_slope_tensor(12, torch.device("cpu"))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.Tensor(reference_slopes(12)))


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20, 24, 32])
def test_alibi_slopes_follow_press_et_al(heads):
    from gpuengine.models.dnabert_s import alibi_slopes

    slopes = alibi_slopes(heads)
    assert len(slopes) == heads
    assert slopes == reference_slopes(heads)
    if math.log2(heads).is_integer():  # geometric: 2^(-8/h), 2^(-16/h), …
        assert slopes == pytest.approx([2.0 ** (-8 * (i + 1) / heads) for i in range(heads)], rel=1e-12)


# -- tokenizer ----------------------------------------------------------------------------------------------
def test_tokenizer_adds_cls_sep_and_neither_pads_nor_truncates(dna_dir):
    from tokenizers import Tokenizer

    from gpuengine.dna_tokenizer import DnaTokenizer

    tok = DnaTokenizer.from_directory(dna_dir)
    assert (tok.family, tok.specials_per_sequence) == ("dnabert-s", 2)
    ids = tok.encode("ACGTACGGT")
    assert ids.dtype == np.int32 and ids[0] == 1 and ids[-1] == 2 and len(ids) < 12
    long = random_dna([12_000], seed=9)[0]
    ids = tok.encode(long)
    assert len(ids) > 2000 and ids[0] == 1 and ids[-1] == 2 and 3 not in ids[1:-1].tolist()
    # the file itself pads to and cuts at 2000: the trap the loader disarms is armed
    raw = Tokenizer.from_file(str(dna_dir / "tokenizer.json"))
    assert len(raw.encode("ACGT").ids) == 2000 and len(raw.encode(long).ids) == 2000
    assert raw.encode("ACGT").ids[-1] == 3


def test_tokenizer_ids_are_the_hub_ids(dna_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(dna_dir / "tokenizer.json"))
    names = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "A", "C", "G", "T"]
    assert [raw.token_to_id(n) for n in names] == list(range(9))
    config = json.loads((dna_dir / "tokenizer.json").read_text())
    assert config["normalizer"] is None
    assert config["pre_tokenizer"]["type"] == "Whitespace"
    assert config["model"]["fuse_unk"] is False and not config["model"]["byte_fallback"]
    assert config["padding"]["strategy"] == {"Fixed": 2000} and config["padding"]["pad_id"] == 3
    assert config["truncation"]["max_length"] == 2000


def test_tokenizer_matches_the_raw_file_and_batches(dna_dir):
    from gpuengine.dna_tokenizer import DnaTokenizer

    tok, raw = DnaTokenizer.from_directory(dna_dir), raw_tokenizer(dna_dir)
    seqs = random_dna([1, 5, 33, 700, 2500], seed=10) + ["ACGTNRYACGT"]
    single = [tok.encode(s) for s in seqs]
    for s, ids in zip(seqs, single):
        assert ids.tolist() == raw.encode(s).ids
    batch = tok.encode_batch(seqs)
    assert all(np.array_equal(a, b) and b.dtype == np.int32 for a, b in zip(single, batch))
    assert np.array_equal(tok.encode(seqs[3], max_residues=100), tok.encode(seqs[3][:100]))


def test_lowercase_is_upper_cased_before_tokenizing(dna_dir):
    from gpuengine.dna_tokenizer import DnaTokenizer

    tok = DnaTokenizer.from_directory(dna_dir)
    seq = random_dna([300], seed=11)[0]
    assert np.array_equal(tok.encode(seq.lower()), tok.encode(seq))
    assert np.array_equal(tok.encode("acgtnAC"), tok.encode("ACGTNAC"))
    # the raw file has no normaliser: one [UNK] per lower-case letter
    assert raw_tokenizer(dna_dir).encode("acgt").ids == [1, 0, 0, 0, 0, 2]


def test_n_and_iupac_letters_become_one_unk_each(dna_dir):
    """Pinned behaviour: every non-ACGT letter is one [UNK] (id 0); merges never span it."""
    from gpuengine.dna_tokenizer import DNA_ALPHABET, DnaTokenizer

    tok = DnaTokenizer.from_directory(dna_dir)
    assert DNA_ALPHABET == frozenset("ACGTNRYSWKMBDHV")
    left, right = random_dna([37, 52], seed=12)

    def body(s):
        return tok.encode(s)[1:-1].tolist()

    for letter in "NRYSWKMBDHV":
        assert body(left + letter + right) == body(left) + [0] + body(right), letter
    assert body("NNNN") == [0, 0, 0, 0]
    assert body(left + "NN" + right) == body(left) + [0, 0] + body(right)
    assert body("N") == [0] and tok.encode("N").tolist() == [1, 0, 2]


@pytest.mark.parametrize("bad", ["ACGU", "ACG-T", "AC GT", "ACGT*", "AC1"])
def test_characters_outside_the_alphabet_are_a_bug_here(dna_dir, bad):
    from gpuengine.dna_tokenizer import DnaTokenizer
    from gpuengine.errors import InternalError

    with pytest.raises(InternalError, match="unvalidated character"):
        DnaTokenizer.from_directory(dna_dir).encode(bad)


def test_tokenizer_without_template_is_refused(dna_dir, tmp_path):
    from gpuengine.dna_tokenizer import DnaTokenizer
    from gpuengine.errors import ModelLoadError

    config = json.loads((dna_dir / "tokenizer.json").read_text())
    config["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"\[CLS\]"):
        DnaTokenizer.from_directory(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        DnaTokenizer.from_directory(tmp_path / "missing")


# -- loading ------------------------------------------------------------------------------------------------
def test_bert_prefix_cls_and_pooler_are_handled(dna_dir, dna_dir_mlm):
    from safetensors.torch import load_file

    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    raw = load_file(dna_dir_mlm / "model.safetensors")
    assert any(k.startswith("bert.") for k in raw) and any(k.startswith("cls.") for k in raw)
    assert any(k.startswith("pooler.") for k in load_file(dna_dir / "model.safetensors"))
    cfg_a, state_a, _ = read_dnabert_s(dna_dir)
    cfg_b, state_b, _ = read_dnabert_s(dna_dir_mlm)
    assert cfg_a == cfg_b and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    seqs = random_dna([90, 400], seed=13)
    out = [OutputSpec(2, "mean")]
    a = embed_with_runner(load_ours(dna_dir), dna_dir, seqs, out)[out[0]]
    b = embed_with_runner(load_ours(dna_dir_mlm), dna_dir_mlm, seqs, out)[out[0]]
    assert_close(np.stack(a), np.stack(b), "BertModel vs BertForMaskedLM directory")


def test_pytorch_model_bin_loads_with_weights_only(dna_dir, tmp_path):
    from safetensors.torch import load_file

    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    target = copy_dir(dna_dir, tmp_path / "bin")
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    _, state, _ = read_dnabert_s(target)
    _, expected, _ = read_dnabert_s(dna_dir)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


class NotATensor:  # module-level so that torch.save can pickle it
    pass


def test_pytorch_model_bin_with_code_is_refused(dna_dir, tmp_path):
    from safetensors.torch import load_file

    from gpuengine.errors import ModelLoadError
    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    target = copy_dir(dna_dir, tmp_path / "evil")
    state = dict(load_file(target / "model.safetensors"))
    state["payload"] = NotATensor()
    torch.save(state, target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="does not unpickle"):
        read_dnabert_s(target)


def _rewrite(dna_dir, tmp_path, change):
    from safetensors.torch import load_file, save_file

    target = copy_dir(dna_dir, tmp_path / "changed")
    tensors = dict(load_file(target / "model.safetensors"))
    change(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def test_missing_key_is_named(dna_dir, tmp_path):
    from gpuengine.errors import ModelLoadError
    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    target = _rewrite(dna_dir, tmp_path, lambda t: t.pop("encoder.layer.1.mlp.wo.bias"))
    with pytest.raises(ModelLoadError, match=r"missing encoder\.layer\.1\.mlp\.wo\.bias"):
        read_dnabert_s(target)


def test_unexpected_key_is_named(dna_dir, tmp_path):
    from gpuengine.errors import ModelLoadError
    from gpuengine.models.dnabert_s_weights import read_dnabert_s

    def add(t):
        t["encoder.layer.0.mlp.gated_layers.bias"] = torch.zeros(2 * TINY["intermediate"])
        t["embeddings.position_embeddings.weight"] = torch.zeros(512, TINY["embed_dim"])

    target = _rewrite(dna_dir, tmp_path, add)
    with pytest.raises(ModelLoadError, match=r"unexpected embeddings\.position_embeddings\.weight, "
                                             r"encoder\.layer\.0\.mlp\.gated_layers\.bias"):
        read_dnabert_s(target)


def test_wrong_shape_and_config_are_named(dna_dir, tmp_path):
    from gpuengine.errors import ModelLoadError
    from gpuengine.models.dnabert_s_weights import build_dnabert_s, read_dnabert_s

    cfg, state, _ = read_dnabert_s(dna_dir)
    state = dict(state)
    state["encoder.layer.0.mlp.wo.weight"] = torch.zeros(TINY["embed_dim"], 7)
    with pytest.raises(ModelLoadError, match=r"layers\.0\.wo\.weight has shape \(96, 7\)"):
        build_dnabert_s(cfg, state, torch.float32)
    target = copy_dir(dna_dir, tmp_path / "relu")
    config = json.loads((target / "config.json").read_text())
    config["hidden_act"] = "relu"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_act is 'relu'"):
        read_dnabert_s(target)


# -- registry and sources -----------------------------------------------------------------------------------
def test_registry_resolves_and_runs_the_synthetic_directory(dna_dir):
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve

    source = resolve(str(dna_dir), allow_download=False)
    assert (source.family, source.format, source.path) == ("dnabert-s", "hf", dna_dir)
    assert [p.name for p in source.weight_files()] == ["model.safetensors"]
    fam = family("dnabert-s")
    assert fam.pooling_rule == PoolingRule(0, 0) and fam.default_max_residues is None
    assert fam.gpu_precision == "fp16" and fam.alphabet == frozenset("ACGTNRYSWKMBDHV")
    weights = fam.read(source)
    assert weights.synthetic
    assert (weights.num_layers, weights.embed_dim, weights.attention_heads, weights.vocab_size) == (
        2, 96, 6, 128)
    model = fam.build(weights, torch.float32)
    assert (model.family, model.num_layers, model.embed_dim) == ("dnabert-s", 2, 96)
    ids = fam.tokenizer(source).encode("ACGTN")
    assert ids[0] == 1 and ids[-1] == 2


def test_plain_bert_directory_is_not_dnabert(dna_dir, tmp_path):
    from gpuengine.errors import ModelLoadError
    from gpuengine.models.sources import resolve

    target = copy_dir(dna_dir, tmp_path / "no_tok")
    (target / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="not DNABERT-S"):
        resolve(str(target), allow_download=False)


def test_hub_name_resolves_from_the_local_cache_only(dna_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from gpuengine.errors import ModelLoadError
    from gpuengine.models.sources import resolve

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="models--zhihan1996--DNABERT-S.*hf download"):
        resolve("zhihan1996/DNABERT-S", allow_download=True)
    repo = tmp_path / "hub" / "models--zhihan1996--DNABERT-S"
    copy_dir(dna_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source = resolve("zhihan1996/DNABERT-S", allow_download=False)
    assert source.family == "dnabert-s" and source.name == "zhihan1996/DNABERT-S"
    assert source.path == repo / "snapshots" / "abc123"


# -- GPU (tools/device_check.sh) ------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_SHAPE = {"num_layers": 4, "embed_dim": 256, "heads": 4, "intermediate": 512, "vocab": 512}  # head_dim 64
GPU_LENGTHS = [1, 9, 150, 151, 500, 500, 640, 1500, 3000, 12_000]


@pytest.fixture(scope="module")
def gpu_dir(tmp_path_factory):
    return write_dnabert_s(tmp_path_factory.mktemp("w") / "dnabert_gpu", **GPU_SHAPE, seed=5)


def gpu_embed(directory, precision, seqs, kind="padded", layer=4, kernels=None):
    from gpuengine.models.dnabert_s import select_alibi_attention

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    device = torch.device("cuda")
    out = [OutputSpec(layer, "mean")]
    vectors = embed_with_runner(load_ours(directory, dtype), directory, seqs, out, budget=16384,
                                attention=select_alibi_attention(device, dtype, kind),
                                device="cuda", precision=precision, kernels=kernels)
    return np.stack(vectors[out[0]])


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["padded", "flex"])
def test_gpu_half_precision_against_fp32(gpu_dir, precision, kind):
    seqs = random_dna(GPU_LENGTHS, seed=20, alphabet="ACGTACGTACGTN")
    cos = cosines(gpu_embed(gpu_dir, precision, seqs, kind), gpu_embed(gpu_dir, "fp32", seqs))
    assert cos.min() >= 0.9999, cos


@pytest.mark.gpu
@needs_cuda
def test_gpu_flex_matches_padded_in_fp16(gpu_dir):
    seqs = random_dna(GPU_LENGTHS, seed=21)
    a = gpu_embed(gpu_dir, "fp16", seqs, "flex")
    b = gpu_embed(gpu_dir, "fp16", seqs, "padded")
    assert cosines(a, b).min() >= 0.99999, cosines(a, b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["padded", "flex"])
@pytest.mark.parametrize("kernels", ["compiled", "triton", "triton-fused-glu"])
def test_gpu_fast_layer_kernels_are_as_close_to_fp32_as_eager(gpu_dir, kind, kernels):
    seqs = random_dna(GPU_LENGTHS, seed=23)
    reference = gpu_embed(gpu_dir, "fp32", seqs)
    fast = cosines(gpu_embed(gpu_dir, "fp16", seqs, kind, kernels=kernels), reference).min()
    eager = cosines(gpu_embed(gpu_dir, "fp16", seqs, kind), reference).min()
    assert fast >= 0.9999 and 1 - fast <= 2 * (1 - eager), (fast, eager)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp32_matches_the_reference(gpu_dir):
    seqs = random_dna([5, 200, 900], seed=22)
    ours = gpu_embed(gpu_dir, "fp32", seqs)
    ref = np.stack(reference_embeddings(gpu_dir, seqs, [4], batched=False)[4]["mean"])
    assert np.abs(ours - ref).max() <= 1e-4, (ours[0, :5], ref[0, :5])


def test_embed_command_with_a_dnabert_directory(dna_dir, tmp_path):
    """`gpuengine embed` picks the family from the directory, keeps CLS/SEP in the mean, does
    not truncate DNA, and stores what the independent reference computes."""
    from typer.testing import CliRunner

    from gpuengine import EmbeddingStore
    from gpuengine.cli import app

    seqs = random_dna([40, 3000, 260], seed=8)
    fasta = tmp_path / "reads.fa"
    fasta.write_text("".join(f">read{i} x\n{s.lower() if i == 2 else s}\n" for i, s in enumerate(seqs)))
    result = CliRunner().invoke(app, ["embed", str(fasta), "--model", str(dna_dir),
                                      "--out", str(tmp_path / "dna.lmdb"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    ref = reference_embeddings(dna_dir, seqs, [2], batched=False)
    with EmbeddingStore(tmp_path / "dna.lmdb") as store:
        assert store.spec.model.family == "dnabert-s" and store.spec.max_residues is None
        ours = store.get_many([f"read{i}" for i in range(3)])
    assert_close(ours, np.stack(ref[2]["mean"]) if isinstance(ref[2]["mean"], list)
                 else ref[2]["mean"], "embed command vs reference")
