"""nsd train / nsd eval: a teacher that learns, a noised student, checkpoints, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import add_images, json_out, new_store, nsd, nsd_argv
from nsd.engine.errors import NsdError
from nsd.engine.models import (checkpoint_path, create_model, file_sha256, get_model_record, load_model,
                               read_state_dict, save_weights)
from nsd.engine.train import NOISE_DEFAULTS, TrainConfig, noisy_student_loss, resolve_noise, train
from nsd.engine.transforms import train_transform
from test_stream import add_selection

# The synthetic classes are positions of a bright square: a flip changes the class (as for digits).
FAST = ["--model", "test_resnet", "--batch-size", "16", "--lr", "5e-3", "--workers", "0", "--no-progress",
        "--hflip", "0"]


# The tests of `lab` are marked slow: its teacher trains for three epochs first.
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A store with a trained teacher `t0` and a one-hot selection `sel` over the unlabeled pool."""
    store = new_store(tmp_path_factory.mktemp("train") / "store")
    ids = add_images(store, {"labeled": 40, "test": 15, "unlabeled": 20})  # 4 classes, 16x16
    res = nsd(store, "train", *FAST, "--name", "t0", "--epochs", "3", "--json")
    assert res.exit_code == 0, res.output
    unl = ids[4 * 55:]
    gold = [i // 20 for i in range(len(unl))]  # add_images writes the classes in order

    def fn(con):  # a label run by t0, as `nsd label` would record it
        con.executemany("INSERT INTO pseudo_labels (image_id, label_run, teacher) VALUES (?, 'label-test', 't0')",
                        [(i,) for i in unl])
        return {"pseudo_labels": len(unl)}

    store.write("test-label", {}, fn)
    add_selection(store, "sel", [(i, [float(c == g) for c in range(4)], None, 2 if g == 0 else 1)
                                 for i, g in zip(unl, gold)])
    return store, json_out(res)


@pytest.mark.slow
def test_teacher_learns_and_registers(lab):
    store, rec = lab
    # A teacher trains with the same noise as a student by default (it labels without it).
    assert rec["selection"] is None and rec["noise"] == {**NOISE_DEFAULTS, "hflip": 0.0}
    assert rec["num_params"] > 0 and rec["class_names"] == ["class0", "class1", "class2", "class3"]
    assert rec["metrics"]["eval"]["test"]["top1"] > 0.6  # chance is 0.25
    lines = Path(checkpoint_path(store, "t0", "metrics.jsonl")).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    snap = next(s for s in store.snapshots() if s["lineage"].get("command") == "train")
    assert snap["lineage"]["command"] == "train" and snap["lineage"]["rows"] == {"models": 1}
    assert snap["lineage"]["reads"] == {"images": rec["images_version"]}
    assert not Path(checkpoint_path(store, "t0", "train_state.pt")).exists()


@pytest.mark.slow
def test_eval_cli_stores_per_class_accuracy(lab):
    store, _ = lab
    res = nsd(store, "eval", "t0", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 60 and out["top1"] > 0.6 and set(out["per_class"]) == {f"class{c}" for c in range(4)}
    rec = get_model_record(store, "t0")
    assert rec["metrics"]["eval"]["test"]["top1"] == out["top1"] and rec["metrics"]["epochs"]
    assert "top-1" in nsd(store, "eval", "t0", "--no-record").stdout
    # evaluations update the model's row, never add one: `models` holds one row per model
    again = json.loads(nsd(store, "eval", "t0", "--split", "labeled", "--json").stdout)
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM models WHERE model = 't0'").fetchone()[0] == 1
        assert con.execute("SELECT count(*), count(DISTINCT model) FROM models").fetchone()[0] == \
            con.execute("SELECT count(DISTINCT model) FROM models").fetchone()[0]
    evals = get_model_record(store, "t0")["metrics"]["eval"]
    assert evals["test"]["top1"] == out["top1"] and evals["labeled"]["top1"] == again["top1"]
    # the row before the eval is still there at the snapshot before it
    assert get_model_record(store, "t0")["run_id"] == rec["run_id"]
    with store.reader() as con:
        before = con.execute("SELECT metrics FROM models AT (VERSION => ?) WHERE model = 't0'",
                             [again["snapshot_id"] - 1]).fetchone()[0]
    assert "labeled" not in json.loads(before)["eval"]


@pytest.mark.slow
def test_checkpoint_round_trip_and_sha(lab, tmp_path):
    store, rec = lab
    net, info = load_model(store, "t0")
    assert info.sha256 == rec["sha256"] == file_sha256(rec["checkpoint"])
    x = torch.randn(3, 1, 16, 16)
    again = create_model("test_resnet", 4, 1).eval()
    path = str(tmp_path / "w.safetensors")
    save_weights(net, path)
    again.load_state_dict(read_state_dict(path))
    with torch.no_grad():
        assert torch.equal(net(x), again(x))
    # A changed checkpoint is refused.
    ckpt = Path(rec["checkpoint"])
    data = ckpt.read_bytes()
    try:
        ckpt.write_bytes(data[:-4] + b"\0\0\0\0")
        with pytest.raises(NsdError, match="changed"):
            load_model(store, "t0")
    finally:
        ckpt.write_bytes(data)


def test_noise_switches_model_and_transform():
    assert resolve_noise(TrainConfig("s", "a", selection="x")) == {**NOISE_DEFAULTS, "randaug_m": 9.0}
    assert resolve_noise(TrainConfig("t", "a")) == NOISE_DEFAULTS  # a teacher too
    off = resolve_noise(TrainConfig("s", "a", noise=False, drop_rate=0.3))
    assert off["drop_rate"] == 0 and off["random_erasing"] == 0 and off["randaug_n"] == 0
    assert resolve_noise(TrainConfig("t", "a", drop_rate=0.3))["drop_rate"] == 0.3
    noisy = create_model("test_resnet", 4, 1, drop_rate=0.5, drop_path_rate=0.2)
    plain = create_model("test_resnet", 4, 1)
    assert noisy.drop_rate == 0.5 and plain.drop_rate == 0.0
    dp = [m for m in noisy.modules() if type(m).__name__ == "DropPath"]
    assert dp and max(m.drop_prob for m in dp) == pytest.approx(0.2)
    assert not [m for m in plain.modules() if type(m).__name__ == "DropPath"]
    x = torch.randn(8, 1, 16, 16)
    noisy.train()
    torch.manual_seed(0)
    a = noisy(x)
    assert not torch.equal(a, noisy(x))  # dropout/drop-path really fire in training
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "RandAugment" in names(train_transform(16, (0.5,), (0.5,), 2, 27))
    assert "RandAugment" not in names(train_transform(16, (0.5,), (0.5,), 0, 27))
    ra = [t for t in train_transform(16, (0.5,), (0.5,), 2, 27).transforms if type(t).__name__ == "RandAugment"]
    assert ra[0].ops[0].magnitude_max == 27


@pytest.mark.slow
def test_student_trains_on_labeled_and_pseudo(lab):
    store, teacher = lab
    res = nsd(store, "train", *FAST, "--name", "s1", "--selection", "sel", "--epochs", "1",
              "--unlabeled-ratio", "2", "--ema", "0.9", "--json")
    assert res.exit_code == 0, res.output
    assert "fewer parameters" not in res.stderr
    rec = json_out(res)
    assert rec["selection"] == "sel" and rec["teacher"] == "t0" and rec["selection_version"] > teacher["images_version"]
    assert rec["noise"] == {**NOISE_DEFAULTS, "hflip": 0.0}
    ep = rec["metrics"]["epochs"][0]
    # An epoch is a pass over the labeled split (160 images / 16 per step), as a teacher's: the
    # selection's size (100 pseudo rows, 20 with 2 copies) does not change the budget.
    assert ep["steps"] == 10
    assert ep["labeled_loss"] > 0 and ep["pseudo_loss"] > 0
    snap = [s for s in store.snapshots() if s["lineage"].get("command") == "train"][-1]
    assert set(snap["lineage"]["reads"]) == {"images", "selections"}


@pytest.mark.slow
def test_resume_gives_identical_weights(lab):
    store, _ = lab
    common = dict(arch="test_resnet", epochs=2, batch_size=32, workers=0, progress=False, eval_split=None,
                  noise=True, randaug_n=1, ema=0.9, lr=5e-3)
    full = train(store, TrainConfig(name="r_full", **common))
    assert train(store, TrainConfig(name="r_cut", **common), stop_after_steps=7) is None  # epoch 1 has 5
    assert Path(checkpoint_path(store, "r_cut", "train_state.pt")).exists()
    res = nsd(store, "train", "--model", "test_resnet", "--name", "r_cut")
    assert res.exit_code == 2 and "--resume" in res.stderr
    cut = train(store, TrainConfig(name="r_cut", arch="ignored"), resume=True)
    a, b = read_state_dict(full["checkpoint"]), read_state_dict(cut["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in full["metrics"]["epochs"]] == [e["loss"] for e in cut["metrics"]["epochs"]]


@pytest.mark.slow
def test_ctrl_c_stops_between_steps_and_resumes_bit_exact(lab):
    """Ctrl-C (SIGINT to the whole process group, DataLoader workers included) saves the state of
    whole steps: batch-norm statistics of an interrupted step never leak into it."""
    store, _ = lab
    args = [*FAST, "--epochs", "4", "--workers", "2", "--eval-split", ""]
    proc = subprocess.Popen(nsd_argv(store, "train", *args, "--name", "sig_cut"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(checkpoint_path(store, "sig_cut", "metrics.jsonl"))
    deadline = time.time() + 240
    while time.time() < deadline and not metrics.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    state = torch.load(checkpoint_path(store, "sig_cut", "train_state.pt"), weights_only=True)
    assert 10 <= state["step"] < 40  # stopped after epoch 1, before the end

    res = nsd(store, "train", *args, "--name", "sig_cut", "--resume")
    assert res.exit_code == 0, res.output
    full = nsd(store, "train", *args, "--name", "sig_full")
    assert full.exit_code == 0, full.output
    a = read_state_dict(get_model_record(store, "sig_cut")["checkpoint"])
    b = read_state_dict(get_model_record(store, "sig_full")["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # running means and variances included


def test_noisy_student_loss_is_the_official_sum():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    labels, targets = torch.tensor([0, 2]), torch.softmax(torch.randn(3, 3), 1)
    loss, labeled, pseudo = noisy_student_loss(logits, labels, targets, label_smoothing=0.1)
    smooth = torch.full((2, 3), 0.1 / 3)
    smooth[torch.arange(2), labels] += 0.9
    want_l = -(smooth * torch.log_softmax(logits[:2], 1)).sum(1).mean()
    want_u = -(targets * torch.log_softmax(logits[2:], 1)).sum(1).mean()
    assert torch.allclose(labeled, want_l) and torch.allclose(pseudo, want_u)
    assert torch.allclose(loss, want_l + want_u)
    teacher, _, none = noisy_student_loss(logits[:2], labels)  # a teacher: labeled rows only
    assert none.item() == 0 and torch.allclose(teacher, want_l)
    only_pseudo, empty, _ = noisy_student_loss(logits[2:], labels[:0], targets)
    assert empty.item() == 0 and torch.allclose(only_pseudo, want_u)


@pytest.mark.parametrize("args, message", [
    (["--model", "test_resnet", "--name", "t0"], "already exists"),
    (["--model", "no_such_net", "--name", "x1"], "unknown timm architecture"),
    (["--model", "test_resnet", "--name", "x2", "--selection", "nope"], "unknown selection"),
    (["--model", "test_resnet", "--name", "bad name"], "invalid model name"),
    (["--model", "test_resnet", "--name", "x3", "--resume"], "nothing to resume"),
])
@pytest.mark.slow
def test_train_errors_are_one_line(lab, args, message):
    res = nsd(lab[0], "train", "--no-progress", *args)
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_unknown_model(lab):
    res = nsd(lab[0], "eval", "nobody")
    assert res.exit_code == 2 and res.stderr.strip() == "error: unknown model 'nobody'"


@pytest.mark.slow
def test_ddp_two_cpu_processes(lab):
    store, _ = lab
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2",
         *nsd_argv(store, "train", *FAST, "--name", "ddp", "--selection", "sel", "--epochs", "1", "--eval-split", "")],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM models WHERE model = 'ddp'").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM runs WHERE kind = 'train' AND name = 'ddp'").fetchone()[0] == 1
    rec = get_model_record(store, "ddp")
    # 160 labeled images over 2 ranks = 80 each, batches of 16 -> 5 steps on every rank.
    assert rec["metrics"]["epochs"][0]["steps"] == 5


@pytest.mark.slow
def test_steps_budget_stops_mid_epoch(lab):
    store, _ = lab
    res = nsd(store, "train", *FAST, "--name", "budget", "--steps", "13", "--eval-split", "", "--json")
    assert res.exit_code == 0, res.output
    rec = json_out(res)
    # 160 labeled images / batch 16 = 10 steps per epoch: one whole epoch, then 3 steps.
    assert [e["steps"] for e in rec["metrics"]["epochs"]] == [10, 13]
    assert "eval" not in rec["metrics"]
    # 13 noised steps from scratch cannot pay for their noise: the run says so; without noise,
    # or starting from a trained model, it does not
    assert "13 steps is too few for noised training" in res.stderr
    plain = nsd(store, "train", *FAST, "--name", "budget2", "--steps", "13", "--eval-split", "", "--no-noise")
    tuned = nsd(store, "train", *FAST, "--name", "budget3", "--steps", "13", "--eval-split", "", "--init-from", "t0")
    assert plain.exit_code == tuned.exit_code == 0, plain.output + tuned.output
    assert "too few" not in plain.stderr + tuned.stderr
