"""Parameter objects of label and balance: one home for their defaults, and the same result
whether a caller passes keywords or the object."""

import dataclasses
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from nsd.cli.balance_cmd import balance as balance_cmd
from nsd.cli.label_cmd import label as label_cmd
from nsd.cli.loop_cmds import loop as loop_cmd
from nsd.cli.main import cli
from nsd.engine.balance import BalanceParams, balance, plan
from nsd.engine.errors import UsageError
from nsd.engine.label import LabelParams, _write_parts, label
from nsd.engine.report import DEFAULT_THRESHOLD
from nsd.engine.store import DEFAULT_STORE, Store
from test_balance import ROWS, add_labels, add_split


def _defaults(command) -> dict:
    return {p.name: p.default for p in command.params}


def test_every_front_end_takes_its_defaults_from_the_parameter_objects():
    assert (BalanceParams.threshold, LabelParams.batch_size, LabelParams.shard_size) == (0.3, 256, 4096)
    label_opts, balance_opts, loop_opts = _defaults(label_cmd), _defaults(balance_cmd), _defaults(loop_cmd)
    for field in dataclasses.fields(LabelParams):
        if field.name in label_opts:
            assert label_opts[field.name] == field.default, field.name
    assert [n for n in ("temperature", "batch_size", "num_workers", "shard_size") if n in label_opts] == \
        ["temperature", "batch_size", "num_workers", "shard_size"]
    assert balance_opts["threshold"] == BalanceParams.threshold == DEFAULT_THRESHOLD
    assert (loop_opts["temperature"], loop_opts["label_batch_size"], loop_opts["shard_size"], loop_opts["threshold"]) \
        == (LabelParams.temperature, LabelParams.batch_size, LabelParams.shard_size, BalanceParams.threshold)
    assert _defaults(cli)["store"] == DEFAULT_STORE == "./nsd-store"


@pytest.mark.parametrize("options, message", [  # one message format for every declared option
    ({"temperature": 0}, "--temperature must be a number in [0.01, 100], got 0"),
    ({"temperature": 1e-300}, "--temperature must be a number in [0.01, 100], got 1e-300"),
    ({"temperature": float("nan")}, "--temperature must be a number in [0.01, 100], got nan"),
    ({"top_k": 0}, "--top-k must be a whole number in [1, 100000], got 0"),
    ({"batch_size": 0}, "--batch-size must be a whole number in [1, 65536], got 0"),
    ({"num_workers": -1}, "--num-workers must be a whole number in [0, 64], got -1"),
    ({"shard_size": 0}, "--shard-size must be a whole number in [1, 10000000], got 0"),
    ({"top_k": 100_001}, "--top-k must be a whole number in [1, 100000], got 100001"),
    ({"batch_size": 65537}, "--batch-size must be a whole number in [1, 65536], got 65537"),
    ({"batch_size": 2.5}, "--batch-size must be a whole number in [1, 65536], got 2.5"),
    ({"num_workers": 10**6}, "--num-workers must be a whole number in [0, 64], got 1000000"),
    ({"shard_size": 10**20}, "--shard-size must be a whole number in [1, 10000000], got 100000000000000000000"),
])
def test_label_params_refuse_values_out_of_range(options, message):
    with pytest.raises(UsageError, match=re.escape(message) + "$"):
        LabelParams(**options).check()
    LabelParams().check()


def test_label_refuses_an_unknown_option_before_it_starts(store):
    with pytest.raises(TypeError, match=r"unknown LabelParams option\(s\): shardsize$"):
        label(store, "teacher", shardsize=3)
    with pytest.raises(UsageError, match="--batch-size must be a whole number in"):  # keywords override PARAMS
        label(store, "teacher", None, None, LabelParams(batch_size=8), batch_size=0)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("params") / "store")
    s.init()
    add_split(s, {"labeled": ["lab"], "test": ["tst"], "unlabeled": ["unl"]})
    add_labels(s, ROWS)
    return s


def test_balance_takes_keywords_or_a_params_object_alike(labeled):
    version = labeled.latest_snapshot()
    params = BalanceParams(labels=version, threshold=0.5, per_class=2, duplicate=False)
    assert plan(labeled, params) == plan(labeled, labels=version, threshold=0.5, per_class=2, duplicate=False)
    assert plan(labeled, params, per_class=1)["per_class"] == 1  # keywords override PARAMS
    by_object = balance(labeled, "by-object", params)
    by_keywords = balance(labeled, "by-keywords", labels=version, threshold=0.5, per_class=2, duplicate=False)
    for out in (by_object, by_keywords):
        out.pop("selection"), out.pop("snapshot_id"), out.pop("run_id")
    assert by_object == by_keywords and by_object["threshold"] == 0.5 and by_object["rows"] > 0
    with labeled.reader() as con:
        rows = [con.execute("SELECT image_id, copies, target FROM selections WHERE selection = ? "
                            "ORDER BY image_id", [name]).fetchall() for name in ("by-object", "by-keywords")]
    assert rows[0] == rows[1] and rows[0]
    with pytest.raises(TypeError, match=r"unknown BalanceParams option\(s\): treshold$"):
        plan(labeled, treshold=0.5)
    with pytest.raises(UsageError, match="--hard and --sharpen exclude each other"):
        plan(labeled, BalanceParams(hard=True), sharpen=2)


def test_write_parts_makes_one_part_per_shard_from_its_batches(tmp_path):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "parts"))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    batches = [(0, ["a", "b"], probs[:2], False), (0, ["c"], probs[2:3], True),  # shard 0 in two batches
               (3, ["d", "e"], probs[3:], True)]
    seen = []
    counts = _write_parts(iter(batches), fs, root, top_k=2, advance=seen.append)
    assert counts == [3, 2] and seen == [2, 1, 2]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000.parquet", "part-00003.parquet"]
    part = pq.read_table(tmp_path / "parts" / "part-00000.parquet").to_pylist()
    assert [r["image_id"] for r in part] == ["a", "b", "c"]
    assert [r["predicted"] for r in part] == [0, 1, 2]
    assert [r["prob_classes"] for r in part] == [[0, 1], [1, 2], [2, 0]]  # top 2, most probable first
    assert np.allclose([r["probs"] for r in part], [[0.7, 0.2], [0.6, 0.3], [0.6, 0.2]])
    assert np.allclose([r["margin"] for r in part], [0.5, 0.3, 0.4])


def test_the_class_cap_is_one_number_for_cli_and_engine(monkeypatch):
    """--max-classes allowed <= 2^20 in the CLI but <= 2^40 through $NSD_MAX_CLASSES."""
    from nsd.engine.sources import Limits
    from nsd.engine.params import MAX_CLASSES_CAP

    assert Limits.from_env(max_classes=MAX_CLASSES_CAP).max_classes == MAX_CLASSES_CAP
    monkeypatch.setenv("NSD_MAX_CLASSES", str(MAX_CLASSES_CAP + 1))
    with pytest.raises(UsageError, match="from 1 to 1,048,576"):
        Limits.from_env()
