"""Writers that never duplicate: two real processes race each mutating step on both catalogs.

Each step starts in both processes at once (a file barrier): the same images ingested twice
into a fresh store (classes created by both), two `train --name twin`, two identical label
runs, two `balance --name sel`, two `tag both`, then a label run while a balance. Every
check-then-write runs under the store's writers' lock inside its commit, so nothing is
duplicated or lost and the loser is told why.
On a PostgreSQL catalog DuckLake itself would commit both appends of a race.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from helpers import records
from nsd.engine.models import file_sha256
from nsd.engine.store import Store
from test_scale import write_folders

WORKER = r"""
import json, sys, time
from pathlib import Path
from nsd.engine.errors import NsdError
from nsd.engine.store import Store

role, sync, src, *uris = sys.argv[1:]
other = "b" if role == "a" else "a"
from nsd.engine.balance import balance
from nsd.engine.ingest import ingest
from nsd.engine.label import label
from nsd.engine.train import TrainConfig, train

def step(name, fn):
    name = f"{uris.index(store.uri)}-{name}"
    Path(sync, f"{name}.{role}").touch()
    waited = time.monotonic()
    while not Path(sync, f"{name}.{other}").exists():
        if Path(sync, f"crashed.{other}").exists() or time.monotonic() - waited > 120:
            sys.exit(f"{role}: the other process never reached {name}")
        time.sleep(0.005)
    try:
        out = {"ok": True, "out": fn()}
    except NsdError as exc:
        out = {"ok": False, "error": str(exc)}
    except BaseException:  # a crash: tell the other process instead of leaving it waiting
        Path(sync, f"crashed.{role}").touch()
        raise
    print(json.dumps({"step": name, **out}, default=str), flush=True)
    return out

for uri in uris:  # one store after the other (one process start for all of them)
  store = Store(uri)
  step("ingest", lambda: ingest(store, src + "/labeled", progress=False, workers=1).to_dict())
  step("ingest-pool", lambda: ingest(store, src + "/unlabeled", progress=False, workers=1).to_dict())
  step("train", lambda: train(store, TrainConfig(name="twin", arch="test_resnet", steps=2, batch_size=16,
                                                 workers=0, progress=False, eval_split=None))["checkpoint"])
  first = step("label", lambda: label(store, "twin", batch_size=16, shard_size=8, num_workers=0, progress=False))
  step("balance", lambda: balance(store, "sel", threshold=0.0, per_class=4))
  step("tag", lambda: store.tag("both").snapshot_id)
  # One process labels again (a new run: T=2) while the other balances the first run.
  if role == "a":
      step("label-balance", lambda: label(store, "twin", temperature=2.0, batch_size=16, shard_size=8,
                                          num_workers=0, progress=False)["rows"])
  else:
      step("label-balance", lambda: balance(store, "sel-b", run=first["out"]["run_id"], threshold=0.0,
                                            per_class=4)["rows"])
"""


def race(uris: list[str], src: Path, tmp_path: Path, env: dict) -> list[dict[str, list[dict]]]:
    """Run WORKER twice at once; returns for each store: step -> the two outcomes."""
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, role, str(sync), str(src), *uris],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for role in ("a", "b")]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:  # a failed test leaves no process behind
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    steps: list[dict[str, list[dict]]] = [{} for _ in uris]
    for out, _ in outs:
        for line in out.splitlines():
            rec = json.loads(line)
            i, rec["step"] = rec["step"].split("-", 1)
            steps[int(i)].setdefault(rec["step"], []).append(rec)
    return steps


@pytest.mark.slow
def test_racing_writers_never_duplicate_on_both_catalogs(tmp_path, pg_server):
    src = write_folders(tmp_path / "src", {"labeled": 8, "unlabeled": 6})
    stores = [Store(tmp_path / "store"), Store(pg_server.database(), str(tmp_path / "data"))]
    for store in stores:
        store.init()
    env = {k: v for k, v in os.environ.items() if k != "NSD_DATA_PATH"}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small shared machine
    for store, steps in zip(stores, race([s.uri for s in stores], src, tmp_path, env)):
        check(store, steps)


def check(store: Store, steps: dict[str, list[dict]]) -> None:
    assert sorted(steps) == ["balance", "ingest", "ingest-pool", "label", "label-balance", "tag", "train"]

    # Same images twice into a fresh store: each image and each class once, nothing lost.
    for name, split, n in (("ingest", "labeled", 32), ("ingest-pool", "unlabeled", 24)):
        a, b = steps[name]
        assert a["ok"] and b["ok"]
        assert a["out"]["added"][split] + b["out"]["added"][split] == n
        assert {a["out"]["already_present"], b["out"]["already_present"]} == {0, n}
    with store.reader() as con:
        assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM images").fetchone() == (56, 56)
        assert con.execute("SELECT list(class_id ORDER BY class_id), list(name ORDER BY class_id) "
                           "FROM classes").fetchone() == ([0, 1, 2, 3], ["class0", "class1", "class2", "class3"])

    # Two runs named twin: one registers, the other is told and leaves no file behind.
    won = [r for r in steps["train"] if r["ok"]]
    lost = [r for r in steps["train"] if not r["ok"]]
    assert len(won) == 1 and len(lost) == 1, steps["train"]
    assert "twin" in lost[0]["error"] and ("already exists" in lost[0]["error"] or "unfinished" in lost[0]["error"])
    rows = records(store, "SELECT checkpoint, sha256, num_classes FROM models WHERE model = 'twin'")
    assert len(rows) == 1 and rows[0]["num_classes"] == 4
    assert rows[0]["checkpoint"].startswith("checkpoints/twin/")  # relative to the data path
    assert store.absolute_path(rows[0]["checkpoint"]) == won[0]["out"]
    assert file_sha256(won[0]["out"]) == rows[0]["sha256"]
    fs, folder = fsspec.core.url_to_fs(store.path("checkpoints", "twin"))
    assert ([Path(p).name for p in fs.ls(folder, detail=False) if p.endswith(".safetensors")]
            == [Path(rows[0]["checkpoint"]).name])

    # Two identical label runs: one snapshot of labels; the other finds the run done.
    a, b = steps["label"]
    assert a["ok"] and b["ok"] and a["out"]["run_id"] == b["out"]["run_id"]
    assert sorted([a["out"]["already_labeled"], b["out"]["already_labeled"]]) == [False, True]
    assert a["out"]["snapshot_id"] == b["out"]["snapshot_id"]
    with store.reader() as con:
        assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM pseudo_labels WHERE label_run = ?",
                           [a["out"]["run_id"]]).fetchone() == (24, 24)

    # One selection named sel, written once.
    won = [r for r in steps["balance"] if r["ok"]]
    lost = [r for r in steps["balance"] if not r["ok"]]
    assert len(won) == 1 and "selection 'sel' already exists" in lost[0]["error"]
    with store.reader() as con:
        n = con.execute("SELECT count(*) FROM selections WHERE selection = 'sel'").fetchone()[0]
        assert n == won[0]["out"]["rows"] > 0
        # A tag is one row whatever the race (tagging again moves it).
        assert con.execute("SELECT count(*) FROM tags WHERE tag = 'both'").fetchone()[0] == 1
    # Labeling while balancing: both land, the selection holds the first run's images only.
    a, b = steps["label-balance"]
    assert a["ok"] and b["ok"] and a["out"] == 24 and b["out"] > 0
    with store.reader() as con:
        assert con.execute("SELECT count(*), count(DISTINCT label_run), count(DISTINCT (label_run, image_id)) "
                           "FROM pseudo_labels").fetchone() == (48, 2, 48)
        assert con.execute("SELECT count(*) FROM selections s WHERE selection = 'sel-b' AND NOT EXISTS ("
                           "SELECT 1 FROM pseudo_labels p WHERE p.image_id = s.image_id AND p.label_run = ?)",
                           [steps["label"][0]["out"]["run_id"]]).fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM selections WHERE selection = 'sel-b'").fetchone()[0] == b["out"]
        runs = con.execute("SELECT kind, count(*) FROM runs GROUP BY kind ORDER BY kind").fetchall()
    assert dict(runs) == {"balance": 2, "ingest": 4, "label": 2, "tag": sum(r["ok"] for r in steps["tag"]),
                          "train": 1}
