"""Teams and scale: the whole chain on every catalog and data path, against real servers.

A local store (SQLite catalog), a PostgreSQL catalog with a local data path, PostgreSQL with an
s3:// data path, and a local store with an s3:// data path: init, ingest, train a teacher,
label, balance, train a student, eval, lineage, diff, tag, through the CLI. PostgreSQL 15 and
an S3 server (moto) run on loopback (tests/servers.py); S3 is configured only through the
standard AWS_* variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from helpers import png_bytes, synthetic_image
from nsd.cli.main import cli
from nsd.engine.store import Store

import numpy as np

TRAIN = ["--model", "test_resnet", "--batch-size", "16", "--lr", "5e-3", "--workers", "0", "--no-progress",
         "--steps", "4", "--json"]


def write_folders(root: Path, per_class: dict[str, int], num_classes: int = 4, seed: int = 0) -> Path:
    """labeled/<class>/*.png, test/<class>/*.png and a flat unlabeled/ folder of synthetic images."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label in range(num_classes):
            for i in range(n):
                folder = root / split if split == "unlabeled" else root / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{label}-{i}.png").write_bytes(png_bytes(synthetic_image(label, rng, 16, num_classes)))
    return root


def make_store(kind: str, data: str, tmp_path: Path, pg_server=None, s3=None) -> tuple[str, str | None]:
    """(--store, --data-path given at init) for a catalog KIND on a DATA path."""
    uri = pg_server.database() if kind == "postgres" else str(tmp_path / "store")
    if data == "s3":
        return uri, f"s3://{s3.bucket()}/lake"
    return uri, (str(tmp_path / "data") if kind == "postgres" else None)


def run(uri: str, *args: str, data_path: str | None = None, ok: bool = True):
    pre = ["--store", uri] + (["--data-path", data_path] if data_path else [])
    res = CliRunner().invoke(cli, [*pre, *args])
    if ok:
        assert res.exit_code == 0, (args, res.output, res.exception)
        return json.loads(res.stdout[res.stdout.index("{") if res.stdout.lstrip()[:1] == "{" else res.stdout.index("["):])
    return res


CONFIGS = [("local", "local"), ("postgres", "local"), ("postgres", "s3"), ("local", "s3")]


@pytest.mark.parametrize("kind,data", CONFIGS, ids=[f"{k}-catalog-{d}-data" for k, d in CONFIGS])
def test_whole_chain(kind, data, tmp_path, request, monkeypatch):
    pg = request.getfixturevalue("pg_server") if kind == "postgres" else None
    s3 = request.getfixturevalue("s3_env") if data == "s3" else None
    monkeypatch.chdir(tmp_path)  # a local path made by mistake from a URL would land here
    src = write_folders(tmp_path / "src", {"labeled": 8, "test": 4, "unlabeled": 8})
    uri, data_path = make_store(kind, data, tmp_path, pg, s3)

    created = run(uri, "init", "--json", data_path=data_path)
    assert created["created"] is True
    # Every later command finds the data path in the catalog: --data-path is not needed again.
    assert run(uri, "ingest", str(src / "labeled"), "--json")["added"]["labeled"] == 32
    run(uri, "ingest", str(src / "test"), "--split", "test", "--json")
    added = run(uri, "ingest", str(src / "unlabeled"), "--json")
    assert added["added"]["unlabeled"] == 32
    teacher = run(uri, "train", *TRAIN, "--name", "t0")
    lab = run(uri, "label", "--teacher", "t0", "--batch-size", "16", "--shard-size", "8", "--json")
    assert lab["rows"] == 32 and lab["already_labeled"] is False
    again = run(uri, "label", "--teacher", "t0", "--batch-size", "16", "--shard-size", "8", "--json")
    assert again["already_labeled"] is True and again["snapshot_id"] == lab["snapshot_id"]
    sel = run(uri, "balance", "--name", "sel", "--threshold", "0", "--per-class", "8", "--json")
    assert sel["rows"] > 0
    student = run(uri, "train", *TRAIN, "--name", "s1", "--selection", "sel")
    ev = run(uri, "eval", "s1", "--json")
    assert 0 <= ev["top1"] <= 1
    chain = run(uri, "lineage", "s1", "--json")
    assert [link["kind"] for link in chain][:4] == ["model", "selection", "label_run", "model"]
    assert chain[3]["name"] == "t0" and chain[-1]["kind"] == "labeled_data"
    diff = run(uri, "diff", "pseudo_labels", str(lab["snapshot_id"] - 1), str(lab["snapshot_id"]), "--json")
    assert diff["added"] == 32 and diff["removed"] == 0
    run(uri, "tag", "after-student", "--json")

    store = Store(uri)
    assert store.tags()["after-student"] == store.latest_snapshot() - 1  # the tag is a snapshot too
    with store.reader() as con:
        counts = con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(DISTINCT image_id) FROM images), "
                             "(SELECT count(*) FROM classes), (SELECT count(DISTINCT model) FROM models), "
                             "(SELECT count(*) FROM pseudo_labels)").fetchone()
        files = [r[0] for r in con.execute("SELECT data_file FROM ducklake_list_files('lake', 'images')").fetchall()]
        ckpts = [r[0] for r in con.execute("SELECT DISTINCT checkpoint FROM models").fetchall()]
    assert counts == (80, 80, 4, 2, 32)
    assert teacher["checkpoint"] != student["checkpoint"]
    if data == "s3":
        assert store.data_path == data_path + "/"
        assert files and all(f.startswith(data_path + "/") for f in files)
        assert all(c.startswith(data_path + "/checkpoints/") for c in ckpts)
        assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no directory named `s3:`
        # The label run's work folder is gone from the bucket once committed.
        import fsspec

        fs, root = fsspec.core.url_to_fs(data_path)
        assert fs.exists(f"{root}/checkpoints") and not fs.exists(f"{root}/label-runs/{lab['run_id']}")
    else:
        assert all(Path(c).is_file() for c in ckpts)
