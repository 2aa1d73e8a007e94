"""Several stores read as one (``EmbeddingStore([...])``, ``EmbeddingStore("out/shards")``,
and ``lookup``/``info``/``export`` of a directory of stores or a list): it answers as the
store ``merge`` makes of the same stores, refuses what ``merge`` refuses, and a single store
is read exactly as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from gpuengine.cli import app
from gpuengine.errors import AmbiguousChoiceError, NotInStoreError, StoreMismatchError, UsageError
from gpuengine.store import EmbeddingStore
from gpuengine.store.merge import merge_stores
from gpuengine.store.multi import MultiStore, stores_info
from gpuengine.store.schema import OutputSpec
from gpuengine.store.sources import expand_stores
from store_shards import MEAN, TOKENS, make_spec, records, write_shards, write_store

SPEC = make_spec()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """3 shards of 150 records in a directory (plus things a directory of stores may hold
    that are not stores), and the store a merge of them makes."""
    base = tmp_path_factory.mktemp("multi")
    recs = records(150)
    shards = write_shards(base / "shards", SPEC, recs, 3)
    (base / "shards" / "logs").mkdir()
    (base / "shards" / "shard-0000-of-0003.done").write_text("")
    shutil.copytree(shards[0], base / "shards" / ".shard-0001-of-0003.lmdb.partial")
    merged = base / "merged.lmdb"
    merge_stores(merged, shards)
    return {"base": base, "dir": base / "shards", "shards": shards, "merged": merged,
            "recs": recs}


def test_the_rule_for_a_directory_of_stores(data):
    assert expand_stores(data["dir"]) == [str(p) for p in data["shards"]]  # no hidden, no logs
    assert expand_stores(data["merged"]) is None  # a store is a store
    assert expand_stores(data["base"] / "nothing") is None
    assert expand_stores([data["dir"], data["merged"]]) == \
        [str(p) for p in data["shards"]] + [str(data["merged"])]
    with pytest.raises(UsageError, match="named twice"):
        expand_stores([data["dir"], data["shards"][1]])
    with EmbeddingStore(data["merged"]) as single:
        assert type(single) is EmbeddingStore  # the single-store path is unchanged


@pytest.mark.parametrize("given", ["dir", "list"])
@pytest.mark.parametrize("output", [MEAN, TOKENS])
def test_the_union_answers_as_the_merged_store(data, given, output):
    paths = data["dir"] if given == "dir" else [str(p) for p in data["shards"]]
    with EmbeddingStore(paths, layer=output.layer, pool=output.pool) as union, \
            EmbeddingStore(data["merged"], layer=output.layer, pool=output.pool) as merged:
        assert isinstance(union, MultiStore) and isinstance(union, EmbeddingStore)
        assert union.spec == merged.spec and union.output == merged.output == output
        assert len(union) == len(merged) == len(data["recs"])
        assert list(union.ids()) == list(merged.ids()) == list(union)
        for (a, x), (b, y) in zip(union.items(), merged.items(), strict=True):
            assert a == b and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        ids = [rid for rid, _ in data["recs"]][::7]
        many, expected = union.get_many(ids), merged.get_many(ids)
        if output.per_token:
            assert [a.tobytes() for a in many] == [b.tobytes() for b in expected]
        else:
            assert many.shape == expected.shape and many.tobytes() == expected.tobytes()
        assert union[ids[3]].tobytes() == merged[ids[3]].tobytes()
        assert ids[3] in union and "nope" not in union and union.get("nope", 7) == 7
        with pytest.raises(KeyError, match="nope"):
            union["nope"]
        with pytest.raises(KeyError, match="nope"):
            union.get_many([ids[0], "nope"])
        assert len(union.get_many([ids[0], "nope"], missing="skip")) == 1
        assert union.tables == ("default",)
        assert union.runs().keys() == {k for k in merged.runs() if not k.startswith("merge-")}
        with EmbeddingStore(union.path, table=union.spec.name) as again:
            assert len(again) == len(union)


def test_a_duplicate_id_appears_once_and_a_conflict_is_refused(tmp_path):
    recs = records(40)
    a = write_store(tmp_path / "a.lmdb", SPEC, recs[:30])
    b = write_store(tmp_path / "b.lmdb", SPEC, recs[20:])  # 10 records in both
    with EmbeddingStore([a, b]) as union:
        assert len(union) == len(recs) and len(list(union.items())) == len(recs)
    c = write_store(tmp_path / "c.lmdb", SPEC, [(recs[5][0], "MKVWWW")])
    with EmbeddingStore([a, c]) as union:
        for call in (lambda: union[recs[5][0]], lambda: union.get_many([recs[5][0]]),
                     lambda: list(union.ids()), lambda: len(union)):
            with pytest.raises(StoreMismatchError, match=repr(recs[5][0])):
                call()
        assert union.get(recs[6][0]) is not None  # other ids read as usual


def test_tables_that_differ_are_refused(tmp_path):
    a = write_store(tmp_path / "a.lmdb", SPEC, records(5))
    b = write_store(tmp_path / "b.lmdb", make_spec(store_dtype="float32"),
                    records(5, prefix="b"))
    for call in (lambda: EmbeddingStore([a, b]), lambda: stores_info([a, b])):
        with pytest.raises(StoreMismatchError, match="store dtype differs"):
            call()


def test_table_choice_over_the_stores(tmp_path):
    small = make_spec(name="small", outputs=(OutputSpec(3, "mean"),))
    a = write_store(tmp_path / "a.lmdb", SPEC, records(5))
    b = write_store(tmp_path / "b.lmdb", small, records(5, prefix="b"))
    with EmbeddingStore([a, b]) as union:  # "default" is in one store: it is the default
        assert union.spec.name == "default" and union.stores == (str(a),)
    with EmbeddingStore([a, b], table="small") as union:
        assert len(union) == len(records(5, prefix="b"))
    c = write_store(tmp_path / "c.lmdb", make_spec(name="other"), records(5, prefix="c"))
    with pytest.raises(AmbiguousChoiceError, match="small, other"):
        EmbeddingStore([b, c])
    with pytest.raises(NotInStoreError):
        EmbeddingStore([a, b], table="nope")


def test_info_sums_each_table_over_the_stores(data):
    info = stores_info(data["dir"])
    table = info["tables"]["default"]
    assert info["stores"] == 3 and table["stores"] == 3
    assert table["records"] == len(data["recs"])
    assert table["spec"] == SPEC.to_json()
    assert [m["shards"] for m in info["members"]] == ["0/3", "1/3", "2/3"]
    assert info["missing_shards"] == "none"
    assert stores_info(data["shards"][::2])["missing_shards"] == "1/3"  # a shard not there yet


# -- the commands ------------------------------------------------------------------------------


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_lookup_of_a_shard_directory(data):
    rid = data["recs"][17][0]
    code, out, err = invoke("lookup", data["dir"], rid, "--json")
    assert code == 0, err
    with EmbeddingStore(data["merged"]) as merged:
        assert np.array_equal(json.loads(out)["embedding"], merged[rid].astype(float))
    code, out, err = invoke("lookup", data["dir"], "nope")
    assert code == 1 and out == "" and "nope" in err


@pytest.mark.parametrize("given", ["dir", "list"])
def test_cli_info_of_several_stores(data, given):
    args = [data["dir"]] if given == "dir" else data["shards"]
    code, out, err = invoke("info", *args, "--json")
    assert code == 0, err
    assert json.loads(out)["tables"]["default"]["records"] == len(data["recs"])
    code, out, err = invoke("info", *args)
    assert code == 0 and "default:" in out and "stores: 3" in out and "0/3" in out
    code, out, err = invoke("info", data["merged"])  # one store: as before
    assert code == 0 and "schema_version: 1" in out


@pytest.mark.parametrize("fmt", ["npz", "tsv"])
def test_cli_export_of_a_directory_equals_the_merged_store(data, tmp_path, fmt):
    code, _, err = invoke("export", data["dir"], "-f", fmt, "-o", tmp_path / f"u.{fmt}")
    assert code == 0, err
    code, _, err = invoke("export", data["merged"], "-f", fmt, "-o", tmp_path / f"m.{fmt}")
    assert code == 0, err
    if fmt == "tsv":
        assert (tmp_path / "u.tsv").read_bytes() == (tmp_path / "m.tsv").read_bytes()
        return
    union, merged = np.load(tmp_path / "u.npz"), np.load(tmp_path / "m.npz")
    assert sorted(union.files) == sorted(merged.files)
    for name in union.files:  # (the zip members' times may differ)
        assert np.array_equal(union[name], merged[name]) and union[name].dtype == merged[name].dtype


def test_cli_export_of_a_list(data, tmp_path):
    code, _, err = invoke("export", *data["shards"], "-o", tmp_path / "u.npz")
    assert code == 0, err
    assert len(np.load(tmp_path / "u.npz")["ids"]) == len(data["recs"])


def test_cli_refuses_stores_that_differ_in_one_line(tmp_path):
    a = write_store(tmp_path / "a.lmdb", SPEC, records(5))
    b = write_store(tmp_path / "b.lmdb", make_spec(max_residues=100), records(5, prefix="b"))
    (tmp_path / "d").mkdir()
    for path in (a, b):
        shutil.move(path, tmp_path / "d" / path.name)
    for args in (["info", tmp_path / "d"], ["lookup", tmp_path / "d", "rec00001"],
                 ["export", tmp_path / "d", "-o", tmp_path / "x.npz"]):
        code, out, err = invoke(*args)
        assert code == 1 and out == "", (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "max_residues (truncation) differs" in err
