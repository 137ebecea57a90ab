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
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import nsd, nsd_argv, png_bytes, records, synthetic_image
from nsd.engine.store import Store

pytestmark = pytest.mark.slow  # real PostgreSQL and S3 servers, processes as nodes

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
    """`nsd` on URI; with OK, asserts exit 0 and returns its JSON."""
    res = nsd(uri, *args, data_path=data_path)
    if ok:
        assert res.exit_code == 0, (args, res.output, res.exception)
        return json.loads(res.stdout[res.stdout.index("{") if res.stdout.lstrip()[:1] == "{" else res.stdout.index("["):])
    return res


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models gain nothing from more, and a shared CI machine's
    busy cores make spinning intra-op threads wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        assert all(store.absolute_path(c).startswith(data_path + "/checkpoints/") for c in ckpts)
        assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no directory named `s3:`
        # The label run's work folder is gone from the bucket once committed.
        import fsspec

        fs, root = fsspec.core.url_to_fs(data_path)
        assert fs.exists(f"{root}/checkpoints") and not fs.exists(f"{root}/label-runs/{lab['run_id']}")
    else:
        assert all(Path(store.absolute_path(c)).is_file() for c in ckpts)
    assert all(c.startswith("checkpoints/") for c in ckpts)  # relative: the store can move


def test_two_nodes_label_one_pool(tmp_path, pg_server, s3_env):
    """Two processes as torchrun --nnodes 2 starts them (RANK, WORLD_SIZE, MASTER_*), each with
    its own scratch directory, one PostgreSQL catalog, one s3:// data path: one snapshot, each
    image once, the same rows as one process on a local store."""
    import torch

    from nsd.engine.ingest import ingest
    from nsd.engine.label import label
    from nsd.engine.models import create_model, save_weights
    from servers import free_port

    src = write_folders(tmp_path / "src", {"labeled": 2, "unlabeled": 10})
    bucket = s3_env.bucket()
    store = Store(pg_server.database(), f"s3://{bucket}/lake")
    local = Store(tmp_path / "local")
    for s in (store, local):
        s.init()
        ingest(s, str(src / "labeled"), progress=False, workers=1)
        ingest(s, str(src / "unlabeled"), progress=False, workers=1)
    torch.manual_seed(0)
    weights = f"s3://{bucket}/teachers/t.safetensors"  # every node reads the teacher from the bucket
    save_weights(create_model("test_resnet", 4, 1), weights)
    before = store.latest_snapshot()

    port = free_port()
    t0 = time.perf_counter()
    procs = []
    for rank in (0, 1):
        scratch = tmp_path / f"node{rank}"
        scratch.mkdir()
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
        env.pop("NSD_DATA_PATH", None)  # the nodes find the data path in the catalog
        cmd = nsd_argv(store, "label", "--teacher", "test_resnet", "--weights", weights, "--shard-size", "8",
                       "--batch-size", "8", "--num-workers", "0", "--json")
        procs.append(subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    print(f"two nodes: {time.perf_counter() - t0:.1f} s")
    (rank0_out, _), (rank1_out, _) = outs
    assert rank1_out.strip() == ""  # rank 0 reports for the whole run
    result = json.loads(rank0_out)
    assert result["world_size"] == 2 and result["rows"] == 40 and result["already_labeled"] is False
    assert result["labeled_here"] == 16  # 5 shards of 8 images: rank 0 takes 2, rank 1 takes 3
    assert result["snapshot_id"] == before + 1 == store.latest_snapshot()  # one snapshot
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node (OMP_NUM_THREADS=1): float sums in the same order
    try:
        one = label(local, "test_resnet", weights, batch_size=8, shard_size=8, num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert one["run_id"] == result["run_id"]  # same teacher, same pool

    query = "SELECT image_id, probs, predicted, confidence FROM pseudo_labels ORDER BY image_id"
    two_nodes, single = records(store, query), records(local, query)
    files = [r["data_file"] for r in records(store, "SELECT data_file FROM ducklake_list_files('lake', "
                                                    "'pseudo_labels')")]
    assert len(two_nodes) == 40 and len({r["image_id"] for r in two_nodes}) == 40
    assert two_nodes == single
    assert files and all(f.startswith(f"s3://{bucket}/lake/") for f in files)
    for rank in (0, 1):  # nothing was written in the nodes' working directories
        assert sorted(p.name for p in (tmp_path / f"node{rank}").iterdir()) == []


def test_catalog_errors_are_shown_as_they_are(tmp_path, pg_server):
    """A wrong port, a missing database or another data path is not "no nsd store"."""
    from servers import free_port

    def fails(uri, *args):
        res = run(uri, *args, "show", "images", ok=False)
        assert res.exit_code != 0 and res.stderr.startswith("error: ") and "Traceback" not in res.output
        return res.stderr

    wrong_port = f"postgres:dbname=postgres host=127.0.0.1 port={free_port()} user={pg_server.user}"
    assert "Connection refused" in fails(wrong_port) and "nsd init" not in fails(wrong_port)
    missing = f"postgres:dbname=nsd_missing host=127.0.0.1 port={pg_server.port} user={pg_server.user}"
    assert 'database "nsd_missing" does not exist' in fails(missing)
    empty = pg_server.database()
    assert "no nsd store at" in fails(empty) and "--data-path" in fails(empty)
    res = run(empty, "init", ok=False)  # a new catalog needs its data path
    assert res.exit_code == 2 and "needs --data-path" in res.stderr
    run(empty, "init", "--json", data_path=str(tmp_path / "data"))
    assert "does not match" in fails(empty, "--data-path", str(tmp_path / "elsewhere"))
    assert run(empty, "show", "images", "--json")  # the recorded data path is used


def test_a_team_mounting_the_data_path_elsewhere_shares_the_store(tmp_path, pg_server):
    """Two machines mounting one share at different paths: the second one's --data-path was
    refused with DuckDB's OVERRIDE_DATA_PATH hint. The marker proves it is the same data."""
    share, mount = tmp_path / "share", tmp_path / "mnt" / "nsd"
    uri = pg_server.database()
    run(uri, "init", "--json", data_path=str(share))
    src = write_folders(tmp_path / "src", {"labeled": 2})
    run(uri, "ingest", str(src / "labeled"), "--json")
    mount.parent.mkdir()
    mount.symlink_to(share, target_is_directory=True)  # the other machine's mount point
    run(uri, "ingest", str(src / "labeled"), "--json", data_path=str(mount))  # writes from there
    assert run(uri, "sql", "SELECT count(*) AS n FROM images", "--json", data_path=str(mount)) == [{"n": 8}]
    assert run(uri, "sql", "SELECT count(*) AS n FROM images", "--json") == [{"n": 8}]
    (tmp_path / "empty").mkdir()
    res = run(uri, "show", "images", data_path=str(tmp_path / "empty"), ok=False)
    assert res.exit_code == 2 and "holds no nsd-store.json of this store" in res.stderr and "Traceback" not in res.output


def test_s3_data_paths_are_claimed_and_probed_at_init(tmp_path, pg_server, s3_env):
    """Two PostgreSQL stores on one s3:// prefix: the first one's gc deleted the second's
    files. A missing bucket passed init and failed at the first ingest. (The test server takes
    any key: a refused key fails at the same write.)"""
    bucket = s3_env.bucket()
    shared = f"s3://{bucket}/same"
    s1, s2 = pg_server.database(), pg_server.database()
    run(s1, "init", "--json", data_path=shared)
    res = run(s2, "init", data_path=shared, ok=False)
    assert res.exit_code == 2 and "belongs to another store" in res.stderr and "Traceback" not in res.output
    assert "no nsd store" in run(s2, "show", "images", ok=False).stderr  # nothing was created

    res = run(pg_server.database(), "init", data_path=f"s3://nosuchbucket-{bucket}/lake", ok=False)
    assert res.exit_code == 2 and res.stderr.startswith("error: cannot write to the data path s3://nosuchbucket")

    # gc sizes the objects it lists (it said 0 B for every S3 file)
    src = write_folders(tmp_path / "src", {"labeled": 2})
    run(s1, "ingest", str(src / "labeled"), "--json")
    import fsspec

    fs, root = fsspec.core.url_to_fs(shared)
    part = next(p for p in fs.find(root) if p.endswith(".parquet"))
    fs.copy(part, f"{root}/main/images/orphan-left-by-a-kill.parquet")
    plan = run(s1, "gc", "--older-than", "0", "--json")
    assert plan["orphaned_files"] == [f"{shared}/main/images/orphan-left-by-a-kill.parquet"]
    assert plan["bytes"]["orphaned_files"] == fs.size(part) > 0
