"""`nsd label`: unnoised soft labels, one snapshot per run, resume after kill -9, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import add_images, new_store, nsd, nsd_argv, records, rows as query
from nsd.engine.label import label
from nsd.engine.models import create_model, save_weights
from nsd.engine.transforms import decode, eval_transform

PER_CLASS = {"labeled": 2, "unlabeled": 10}  # 40 unlabeled 16x16 images, 4 classes
METRICS = ("predicted", "confidence", "margin", "entropy")  # what a row says besides its probabilities


def make_store(path):
    return new_store(path, PER_CLASS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("w") / "teacher.safetensors")
    save_weights(create_model("test_resnet", 4, 1), path)
    return path


def register(store, name, weights_path, drop_rate=0.5):
    """A models row for a teacher trained with dropout (which labeling must switch off)."""
    from nsd.engine.models import file_sha256

    row = [name, "train-x", "test_resnet", 4, [f"class{i}" for i in range(4)], 1, 16, [0.5], [0.5],
           json.dumps({"drop_rate": drop_rate}), None, None, None, None, 0, "{}", weights_path,
           file_sha256(weights_path), None, None]

    def fn(con):
        con.execute(f"INSERT INTO models VALUES ({', '.join('?' * len(row))})", row)
        return {"models": 1}

    store.write("register", {"model": name}, fn)


def rows(store, run=None):
    """The pseudo_labels rows (of RUN) as dicts, in image order."""
    sql = ("SELECT image_id, label_run, teacher, teacher_sha256, probs, prob_classes, predicted, "
           "confidence, margin, entropy FROM pseudo_labels")
    args = []
    if run:
        sql += " WHERE label_run = ?"
        args = [run]
    return records(store, sql + " ORDER BY image_id", args)


def label_snapshots(store):
    return [s for s in store.snapshots() if s["lineage"].get("command") == "label"]


def unlabeled(store, snap=None):
    return query(store, "SELECT image_id, bytes FROM images WHERE split = 'unlabeled' ORDER BY image_id",
                 snapshot=snap)


def test_store_teacher_no_noise_stats_and_one_snapshot(tmp_path, weights):
    s = make_store(tmp_path / "s")
    register(s, "teach", weights)
    before = s.latest_snapshot()
    out = label(s, "teach", shard_size=16, batch_size=7, progress=False)
    assert out["rows"] == 40 and out["snapshot_id"] == before + 1 and not out["already_labeled"]
    snaps = label_snapshots(s)
    assert len(snaps) == 1
    lin = snaps[0]["lineage"]
    assert lin["run_id"] == out["run_id"] and lin["rows"] == {"pseudo_labels": 40}
    assert lin["reads"] == {"images": before, "models": before}
    assert lin["params"]["temperature"] == 1.0

    got = rows(s)
    assert len(got) == 40 and len({r["image_id"] for r in got}) == 40
    assert {r["label_run"] for r in got} == {out["run_id"]} and {r["teacher"] for r in got} == {"teach"}

    # Reference: the teacher in eval mode through the eval transform, computed here by hand.
    net = create_model("test_resnet", 4, 1, drop_rate=0.5)
    from nsd.engine.models import load_state, read_state_dict
    load_state(net, read_state_dict(weights), "ref")
    tf = eval_transform(16, (0.5,), (0.5,))
    x = torch.stack([tf(decode(b, 1)) for _, b in unlabeled(s)])
    with torch.no_grad():
        ref_eval = torch.softmax(net.eval()(x), 1).numpy()
        ref_train = torch.softmax(net.train()(x), 1).numpy()  # batch-norm stats + dropout: noise
    probs = np.array([r["probs"] for r in got])
    np.testing.assert_allclose(probs, ref_eval, atol=1e-5)
    assert np.abs(probs - ref_train).max() > 1e-3  # the check above can tell noise apart
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert all(r["prob_classes"] is None for r in got)  # dense
    conf = np.array([r["confidence"] for r in got])
    np.testing.assert_allclose(conf, probs.max(1), atol=1e-6)
    assert [r["predicted"] for r in got] == list(probs.argmax(1))
    srt = np.sort(probs, 1)
    np.testing.assert_allclose([r["margin"] for r in got], srt[:, -1] - srt[:, -2], atol=1e-6)
    np.testing.assert_allclose([r["entropy"] for r in got], -(probs * np.log(probs)).sum(1), atol=1e-5)

    # Same command again: nothing new, the existing run is reported.
    again = label(s, "teach", shard_size=16, progress=False)
    assert again["already_labeled"] and again["run_id"] == out["run_id"]
    assert again["snapshot_id"] == out["snapshot_id"] and again["rows"] == 40
    assert len(rows(s)) == 40 and len(label_snapshots(s)) == 1
    assert not Path(s.path("label-runs", out["run_id"])).exists()  # work dir removed


def test_temperature_top_k_and_pinned_version(tmp_path, weights):
    s = make_store(tmp_path / "s")
    pinned = s.latest_snapshot()
    add_images(s, {"unlabeled": 2}, seed=7)  # 8 more images after the pinned version
    dense = {}
    for t in (0.5, 1.0, 3.0):
        out = label(s, "test_resnet", weights, images=str(pinned), temperature=t, progress=False)
        assert out["rows"] == 40 and out["images_version"] == pinned
        dense[t] = np.array([r["probs"] for r in rows(s, out["run_id"])])
    assert len(label_snapshots(s)) == 3
    ent = {t: -(p * np.log(p)).sum(1).mean() for t, p in dense.items()}
    assert ent[0.5] < ent[1.0] < ent[3.0]  # higher T, softer labels
    # softmax(z / T) is proportional to softmax(z) ** (1 / T)
    for t in (0.5, 3.0):
        ref = dense[1.0] ** (1 / t)
        np.testing.assert_allclose(dense[t], ref / ref.sum(1, keepdims=True), atol=1e-5)
    assert (dense[0.5].argmax(1) == dense[3.0].argmax(1)).all()

    out = label(s, "test_resnet", weights, images=str(pinned), top_k=2, progress=False)
    top = rows(s, out["run_id"])
    full = dense[1.0]
    assert len(top) == 40
    for r, p in zip(top, full):
        assert len(r["probs"]) == 2 and len(r["prob_classes"]) == 2
        order = np.argsort(-p)[:2]
        assert list(r["prob_classes"]) == list(order) and r["predicted"] == order[0]
        np.testing.assert_allclose(r["probs"], p[order], atol=1e-6)
        assert r["probs"][0] == pytest.approx(r["confidence"])
        assert r["margin"] == pytest.approx(p[order[0]] - p[order[1]], abs=1e-6)
        assert r["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)  # entropy of the full vector

    latest = label(s, "test_resnet", weights, progress=False)  # default: the latest version
    assert latest["rows"] == 48


def test_cpu_batch_parallel_path_gives_the_serial_rows(tmp_path, weights):
    """With 2 torch threads and decode workers, batches run on 2 threads of one intra-op thread
    each. The rows equal those of the serial path with one torch thread (num_workers=0), so they
    do not depend on the number of cores; the thread count is given back afterwards."""
    threads = torch.get_num_threads()
    got = {}
    try:
        for torch_threads, workers in ((1, 0), (2, 1)):
            torch.set_num_threads(torch_threads)
            s = make_store(tmp_path / f"s{workers}")
            out = label(s, "test_resnet", weights, num_workers=workers, batch_size=3, shard_size=8,
                        progress=False)
            assert out["rows"] == 40 and torch.get_num_threads() == torch_threads
            got[workers] = rows(s)
    finally:
        torch.set_num_threads(threads)
    assert [r["image_id"] for r in got[0]] == [r["image_id"] for r in got[1]]
    assert got[0][0]["label_run"] == got[1][0]["label_run"]  # same run id: the same inputs
    np.testing.assert_array_equal(np.array([r["probs"] for r in got[0]]), np.array([r["probs"] for r in got[1]]))
    assert [[r[k] for k in METRICS] for r in got[0]] == [[r[k] for k in METRICS] for r in got[1]]


def test_bad_input_is_one_line_exit_2(tmp_path, weights):
    s = make_store(tmp_path / "s")
    w5 = str(tmp_path / "five.safetensors")
    save_weights(create_model("test_resnet", 5, 1), w5)
    cases = {
        ("--teacher", "test_resnet", "--weights", str(tmp_path / "nope.safetensors")): "not found",
        ("--teacher", "test_resnet", "--weights", w5): "do not fit",
        ("--teacher", "test_resnet", "--weights", weights, "--images", "99"): "unknown version 99",
        ("--teacher", "test_resnet", "--weights", weights, "--temperature", "0"): "temperature",
        ("--teacher", "test_resnet", "--weights", weights, "--top-k", "9"): "top-k",
        ("--teacher", "no_such_model"): "unknown model",
        ("--teacher", "no_such_arch", "--weights", weights): "unknown timm architecture",
    }
    for args, needle in cases.items():
        res = nsd(s, "label", *args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, (args, res.output)
    assert not label_snapshots(s) and not rows(s)

    res = nsd(s, "label", "--teacher", "test_resnet", "--weights", weights, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["rows"] == 40
    res = nsd(s, "label", "--teacher", "test_resnet", "--weights", weights)
    assert res.exit_code == 0 and "already labeled" in res.stdout and str(out["snapshot_id"]) in res.stdout


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_rows(tmp_path, weights):
    s = make_store(tmp_path / "killed")
    args = ["--teacher", "test_resnet", "--weights", weights, "--shard-size", "8", "--batch-size", "3"]
    env = {**os.environ, "NSD_TEST_LABEL_PAUSE": "3"}
    proc = subprocess.Popen(nsd_argv(s, "label", *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = s.root / "data" / "label-runs"
    deadline = time.time() + 60
    while time.time() < deadline and not list(work.glob("*/*/part-*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list(work.glob("*/*/part-*.parquet"))
    assert 1 <= len(parts) < 5, parts  # killed mid-run
    assert not rows(s) and not label_snapshots(s)  # nothing half-finished is visible

    res = subprocess.run(nsd_argv(s, "label", *args, "--json"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rows"] == 40 and out["labeled_here"] == 40 - 8 * len(parts)  # skipped finished parts

    ref_store = make_store(tmp_path / "ref")
    ref = label(ref_store, "test_resnet", weights, shard_size=8, batch_size=3, progress=False)
    assert ref["run_id"] == out["run_id"]
    assert rows(s) == rows(ref_store)
    assert len(label_snapshots(s)) == 1 and not list(work.glob("*/*/*"))


@pytest.mark.slow
def test_gc_spares_the_parts_of_a_running_label_run_even_resumed_ones(tmp_path, weights):
    """gc once deleted 16 parts of a live label run ("16 shard(s) missing"): label did not
    count as running. A resumed run's parts are older than its start, so they are spared by
    folder, not by age."""
    s = make_store(tmp_path / "s")
    args = ["--teacher", "test_resnet", "--weights", weights, "--shard-size", "8", "--batch-size", "3"]
    work = s.root / "data" / "label-runs"

    def start_and_wait(n_parts):
        env = {**os.environ, "NSD_TEST_LABEL_PAUSE": "4"}
        proc = subprocess.Popen(nsd_argv(s, "label", *args, "--json"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(work.glob("*/*/part-*.parquet"))) < n_parts:
            time.sleep(0.05)
        return proc

    killed = start_and_wait(1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    old = sorted(work.glob("*/*/part-*.parquet"))
    assert len(old) == 1
    for p in old:  # killed a day ago: older than any running command's start
        os.utime(p, (time.time() - 86400, time.time() - 86400))
    resumed = start_and_wait(2)
    gc = nsd(s, "gc", "--older-than", "0", "--delete", "--json")
    assert gc.exit_code == 0, gc.output
    out = json.loads(gc.stdout)
    assert out["orphaned_files"] == [] and {item["path"] for item in out["skipped"]} >= {str(p) for p in old}
    assert all("label running on" in item["why"] for item in out["skipped"])
    assert all(p.exists() for p in old)
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["rows"] == 40 and query(s, "SELECT count(*) FROM pseudo_labels") == [(40,)]
    assert not list((s.root / "data" / "live").iterdir())  # the heartbeat went with the command


@pytest.mark.slow
def test_torchrun_two_ranks_cover_each_image_once(tmp_path, weights):
    s = make_store(tmp_path / "s")
    # --standalone: a free rendezvous port, so parallel test runs do not collide.
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           *nsd_argv(s, "label", "--teacher", "test_resnet", "--weights", weights, "--shard-size", "6", "--json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.index("{")
    out = json.loads(res.stdout[start:res.stdout.rindex("}") + 1])
    assert out["world_size"] == 2 and out["rows"] == 40
    assert out["labeled_here"] == 18  # rank 0 took the block of shards 0-2 of 7 (3 x 6 images)
    got = rows(s)
    assert sorted(r["image_id"] for r in got) == sorted(i for i, _ in unlabeled(s))  # each once, none missing
    assert len(label_snapshots(s)) == 1

    ref_store = make_store(tmp_path / "ref")
    label(ref_store, "test_resnet", weights, shard_size=6, progress=False)
    ref = rows(ref_store)
    assert [r["image_id"] for r in got] == [r["image_id"] for r in ref]
    np.testing.assert_allclose([r["probs"] for r in got], [r["probs"] for r in ref], atol=1e-6)
