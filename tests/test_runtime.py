"""The shared process helpers (engine/runtime, errors.first_line), the noise ranges, the resolved
run record of training, and the loop's per-step options: each on its own, no training run."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from nsd.engine.errors import UsageError, first_line
from nsd.engine.loop import STUDENT_STEPS, TEACHER_STEPS, LoopConfig, label_options, train_options
from nsd.engine.runtime import Dist, pick_device, progress_bar
from nsd.engine.train import ResolvedRun, TrainConfig, resolve_noise
from nsd.engine.transforms import NOISE_DEFAULTS, NOISE_RANGES, check_noise


def test_dist_without_torchrun_is_one_process_whose_collectives_do_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = Dist.from_env()
    assert (dist.rank, dist.world, dist.local_rank, dist.owned) == (0, 1, 0, False)
    assert not torch.distributed.is_initialized()
    sums = torch.tensor([1.0, 2.0])
    dist.all_reduce(sums)
    dist.barrier()
    assert sums.tolist() == [1.0, 2.0]
    assert dist.broadcast(lambda: {"v": 7}) == {"v": 7}
    with pytest.raises(UsageError, match="from rank 0"):  # rank 0's error reaches the caller
        dist.broadcast(lambda: (_ for _ in ()).throw(UsageError("from rank 0")))
    dist.close()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Dist.from_env() == Dist()


def test_pick_device_names_bad_devices_in_one_line():
    auto = pick_device("auto")
    assert pick_device(None) == pick_device("") == auto
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            pick_device("cuda:1")
    else:
        assert pick_device("cuda", local_rank=0) == torch.device("cuda", 0)


def test_progress_bar_prints_descriptions_literally_with_rate_and_eta(capsys):
    with progress_bar(True, fields=("loss {loss:.4f}",)) as bar:
        task = bar.add_task("[b]x[/b]", total=4, loss=float("nan"))
        for _ in range(4):
            bar.update(task, advance=1, loss=0.25, rate=1234.0)
    err = capsys.readouterr().err
    assert "[b]x[/b]" in err and "4/4" in err and "loss 0.2500" in err
    assert "1,234 img/s" in err and "ETA" in err
    with progress_bar(False) as quiet:  # the same calls, no output
        task = quiet.add_task("x", total=2)
        quiet.advance(task, 2)
        quiet.update(task, advance=1)
    assert capsys.readouterr().err == ""


def test_first_line_is_the_first_non_blank_line():
    assert first_line(ValueError("\n  disk full  \nat block 7")) == "disk full"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError(""), empty="") == ""


def test_noise_is_checked_once_against_its_ranges():
    assert check_noise(dict(NOISE_DEFAULTS)) == NOISE_DEFAULTS
    for key, (low, high, closed) in NOISE_RANGES.items():
        with pytest.raises(UsageError, match=f"--{key.replace('_', '-')} must be in"):
            check_noise({key: low - 1})
        if closed:
            assert check_noise({key: high}) == {key: high}
        else:
            with pytest.raises(UsageError):
                check_noise({key: high})
    with pytest.raises(UsageError, match="--randaug-m"):
        resolve_noise(TrainConfig("s", "a", randaug_m=31))
    with pytest.raises(UsageError, match="--drop-rate"):
        resolve_noise(TrainConfig("s", "a", drop_rate=1.0))


def test_resolved_run_survives_the_resumable_state():
    run = ResolvedRun(images_version=4, class_names=["a", "b", "c"], in_chans=1, width=28, labeled=30, test=10,
                      image_size=28, noise=dict(NOISE_DEFAULTS), selection="sel", selection_version=5,
                      selection_rows=90, teacher="t0", init={"model": "t0"}, mean=[0.5], std=[0.5])
    assert run.student and run.num_classes == 3
    saved = asdict(run)  # what train_state.pt holds: plain values only
    assert ResolvedRun.from_state(saved) == run
    # A state written before a field existed loads; keys it no longer knows are ignored.
    older = {k: v for k, v in saved.items() if k not in ("init", "mean", "std")}
    back = ResolvedRun.from_state({**older, "retired": 1})
    assert (back.init, back.mean, back.std) == (None, None, None) and back.images_version == 4
    teacher = ResolvedRun.from_state({**older, "selection": None, "selection_version": None})
    assert not teacher.student


def test_loop_decides_the_teachers_budget_noise_and_every_steps_device():
    cfg = LoopConfig(device="cpu", train={"epochs": 5, "steps": 100, "noise": None, "lr": 1e-3},
                     teacher_epochs=2, teacher_noise=False, label={"batch_size": 64})
    student = train_options(cfg)
    assert student == {"device": "cpu", "epochs": 5, "steps": 100, "noise": None, "lr": 1e-3}
    # The teacher's budget is its own (epochs here); noise off for the teacher only.
    assert train_options(cfg, teacher=True) == {**student, "epochs": 2, "steps": None, "noise": False}
    assert label_options(cfg) == {"device": "cpu", "batch_size": 64}
    # Without --teacher-*, the teacher trains TEACHER_STEPS whatever the students' budget; without
    # --epochs/--steps, the students train STUDENT_STEPS.
    as_students = LoopConfig(train={"epochs": 5})
    assert train_options(as_students) == {"device": "auto", "epochs": 5}
    assert train_options(as_students, teacher=True) == {"device": "auto", "steps": TEACHER_STEPS}
    unset = LoopConfig(train={"epochs": None, "steps": None, "lr": 1e-3})
    assert train_options(unset) == {"device": "auto", "steps": STUDENT_STEPS, "lr": 1e-3}
    assert train_options(unset, teacher=True) == {"device": "auto", "steps": TEACHER_STEPS, "lr": 1e-3}
    assert train_options(LoopConfig(train={"epochs": 5}, teacher_steps=40), teacher=True) == {"device": "auto",
                                                                                               "steps": 40}
    assert train_options(LoopConfig(teacher_epochs=3), teacher=True)["epochs"] == 3
    assert "epochs" not in train_options(LoopConfig(teacher_steps=3), teacher=True)


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "--batch-size must be a whole number in \\[1, 65536\\], got 0"),
    ({"batch_size": 10**9}, "--batch-size must be"),
    ({"workers": -1}, "--workers must be"),
    ({"workers": 10**6}, "--workers must be"),
    ({"epochs": 0}, "--epochs must be"),
    ({"steps": 10**12}, "--steps must be"),
    ({"seed": -1}, "--seed must be"),
    ({"seed": 2**32}, "--seed must be"),
    ({"image_size": 1.5}, "--image-size must be"),
])
def test_a_python_caller_gets_the_clis_bounds_on_a_run(options, message):
    from nsd.engine.train import check_sizes

    with pytest.raises(UsageError, match=message):
        check_sizes(TrainConfig(name="m", arch="test_resnet", **options))
    check_sizes(TrainConfig(name="m", arch="test_resnet", steps=10, seed=2**32 - 1, image_size=4096))
