"""The Noisy Student loop (`nsd loop`): teacher, then label -> balance -> noised student, repeated.

Every step is an ordinary `label`, `balance` or `train` call, so each commits its own snapshot
with its own lineage, and the loop tags that snapshot ``<name>-it<i>-<step>``. Names are fixed
by the loop's name, so an interrupted loop finds its finished steps in the store and resumes at
the step it stopped in:

* ``<name>-m0``           the teacher, trained on the labeled split (iteration 0)
* ``<name>-sel<i>``       the selection balanced from the labels of ``<name>-m<i-1>``
* ``<name>-m<i>``         the student trained on labeled + ``<name>-sel<i>``; next teacher
* ``<name>-baseline``     (with ``baseline``) the compute-matched yardstick: the final
                          student's architecture trained on the labeled split alone with the
                          students' options for the loop's TOTAL steps (teacher + every
                          student). A student must beat it for self-training to have paid.

Budgets: an epoch is one pass over the labeled split for the teacher and the students alike
(engine/train.py), so a shrinking selection never shrinks a student's budget. With
``student_init="teacher"`` each student starts from its teacher's weights when the
architectures match (a larger student starts from scratch).

The images are pinned once, by the tag ``<name>-images``, so every iteration labels and trains
on the same snapshot of the pool even when more images are ingested meanwhile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from nsd.engine.balance import balance
from nsd.engine.errors import UsageError
from nsd.engine.label import label
from nsd.engine.lineage import snapshots_by_run
from nsd.engine.models import count_params, create_model, get_model_record, model_exists
from nsd.engine.params import MAX_EPOCHS, MAX_STEPS, check_options, option
from nsd.engine.runs import balance_run, label_run_of
from nsd.engine.store import Store, check_name, name_literal
from nsd.engine.train import TrainConfig, has_saved_state, train
from nsd.schemas import read_sql

STEPS = ("teacher", "label", "balance", "student")


# The loop's budgets when none is given, in optimiser steps (the teacher's, then each
# student's). Chosen by bench/results/study-*.md (see the README's "Recipe" section).
TEACHER_STEPS = 2400
STUDENT_STEPS = 1200


@dataclass
class LoopConfig:
    """One loop (``nsd loop``'s own options, declared once; it takes train's, label's and
    balance's declared options too and passes them on in ``train``, ``label``, ``balance``)."""

    name: str = option("ns", "Loop name: models NAME-m0 (teacher), NAME-m1, ...; selections NAME-sel1, ...")
    models: tuple[str, ...] | str = option(("test_resnet",), "timm architectures: the teacher, then the student "
                                                             "of each iteration (the last repeats).",
                                           metavar="A,B,C,...")
    iterations: int = option(3, "Label -> balance -> student rounds.", low=1, high=1000, whole=True)
    images: str | None = option(None, "Images version (default: latest).", metavar="REF")
    device: str = option("auto", "auto, cpu, cuda, cuda:N (every step, train and label).")
    # The teacher's budget (None: TEACHER_STEPS) and noise (None: as the students').
    teacher_epochs: int | None = option(None, "Teacher epochs (passes over the labeled split) "
                                              f"[default: {TEACHER_STEPS:,} steps].", low=1, high=MAX_EPOCHS, whole=True)
    teacher_steps: int | None = option(None, "Teacher steps (instead of epochs).", low=1, high=MAX_STEPS, whole=True)
    teacher_noise: bool | None = option(None, "Noise for the teacher [default: as the students, like `nsd train`].",
                                        flag="--teacher-noise/--no-teacher-noise")
    # Per-step options, passed as keyword arguments to train (TrainConfig), label and balance.
    train: dict = field(default_factory=dict)  # the students'; the teacher's too unless overridden
    teacher: dict = field(default_factory=dict)  # any other overrides of `train` for the teacher
    label: dict = field(default_factory=dict)
    balance: dict = field(default_factory=dict)
    baseline: bool = option(False, "Also train NAME-baseline: the final student's architecture on the labeled "
                                   "split alone, same options, for the loop's total steps (teacher + "
                                   "students): compute-matched.", flag="--baseline")
    student_init: str = option("teacher", "Start each student from its teacher's weights (same architecture "
                                          "only) or from scratch.", choices=("teacher", "scratch"))

    def __post_init__(self):
        if isinstance(self.models, str):  # "a,b,c", as the CLI takes it
            self.models = tuple(m.strip() for m in self.models.split(","))


def model_name(name: str, i: int) -> str:
    return f"{name}-m{i}"


def selection_name(name: str, i: int) -> str:
    return f"{name}-sel{i}"


def baseline_name(name: str) -> str:
    return f"{name}-baseline"


def step_tag(name: str, i: int, step: str) -> str:
    return f"{name}-it{i}-{step}"


def arch_of(models, i: int) -> str:
    return models[min(i, len(models) - 1)]


def train_options(cfg: LoopConfig, teacher: bool = False) -> dict:
    """The TrainConfig options of the students or, with TEACHER, of the teacher. Each has its
    own budget: --epochs/--steps for the students, --teacher-epochs/--teacher-steps for the
    teacher, else STUDENT_STEPS and TEACHER_STEPS."""
    opts = {"device": cfg.device, **{k: v for k, v in cfg.train.items() if v is not None or k not in ("epochs", "steps")}}
    if not opts.get("epochs") and not opts.get("steps"):
        opts["steps"] = STUDENT_STEPS
    if not teacher:
        return opts
    if cfg.teacher_noise is not None:
        opts["noise"] = cfg.teacher_noise
    opts.pop("epochs", None)
    opts["steps"] = cfg.teacher_steps
    if cfg.teacher_epochs and not cfg.teacher_steps:
        opts["epochs"] = cfg.teacher_epochs
    elif not cfg.teacher_steps:
        opts["steps"] = TEACHER_STEPS
    return dict(opts, **cfg.teacher)


def label_options(cfg: LoopConfig) -> dict:
    """The options of each iteration's `label` call."""
    return dict({"device": cfg.device}, **cfg.label)


def loop(store: Store, cfg: LoopConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the loop; returns ``{"name", "images_version", "steps", "table"}``.

    ``steps`` lists what each step did (``ran`` or ``done before``) with its snapshot;
    ``table`` is `report()` of the loop's models.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    store.require()
    check_name(cfg.name, "loop name")
    _check(cfg)
    images = _pin_images(store, cfg)
    steps: list[dict] = []

    def record(i, step, what, status, snapshot):
        tag = step_tag(cfg.name, i, step)
        if snapshot is not None and store.tags().get(tag) != snapshot:
            store.tag(tag, snapshot, force=True)  # the loop's own step tags follow its steps
        steps.append({"iteration": i, "step": step, "name": what, "status": status, "snapshot": snapshot, "tag": tag})

    def train_step(i, selection):
        name = model_name(cfg.name, i)
        if model_exists(store, name):
            log(f"[{cfg.name}] iteration {i}: {name} done before")
            return record(i, "student" if i else "teacher", name, "done before",
                          _run_snapshot(store, get_model_record(store, name)["run_id"]))
        opts = train_options(cfg, teacher=i == 0)
        if i and cfg.student_init == "teacher" and arch_of(cfg.models, i) == arch_of(cfg.models, i - 1):
            opts["init_from"] = model_name(cfg.name, i - 1)
        tc = TrainConfig(name=name, arch=arch_of(cfg.models, i), selection=selection, images=str(images), **opts)
        resume = has_saved_state(store, name)
        log(f"[{cfg.name}] iteration {i}: {'resuming' if resume else 'training'} "
            f"{'student' if i else 'teacher'} {name} ({tc.arch})")
        rec = train(store, tc, resume=resume)
        record(i, "student" if i else "teacher", name, "ran", rec["snapshot_id"])

    # Check the architectures before hours of work: the names must exist in timm, and the
    # loop's names must not belong to a different experiment.
    sizes = [count_params(create_model(arch, 2, 1)) for arch in cfg.models]
    for i in range(cfg.iterations + 1):
        name = model_name(cfg.name, i)
        if model_exists(store, name) and get_model_record(store, name)["arch"] != arch_of(cfg.models, i):
            raise UsageError(f"{name} exists with architecture {get_model_record(store, name)['arch']!r}, "
                             f"not {arch_of(cfg.models, i)!r}: pick another --name for a new loop")
    for a, b in zip(sizes, sizes[1:]):
        if b < a:
            log(f"warning: a student in --models is smaller than its teacher ({b:,} < {a:,} parameters); "
                "Noisy Student wants equal or larger students")

    train_step(0, None)
    for i in range(1, cfg.iterations + 1):
        teacher, sel = model_name(cfg.name, i - 1), selection_name(cfg.name, i)
        if _selection_exists(store, sel):
            run = _selection_label_run(store, sel)
            record(i, "label", run, "done before", _run_snapshot(store, run))
            record(i, "balance", sel, "done before", _balance_snapshot(store, sel))
        else:
            log(f"[{cfg.name}] iteration {i}: labeling the pool with {teacher}")
            lab = label(store, teacher, images=images, **label_options(cfg))
            record(i, "label", lab["run_id"], "done before" if lab.get("already_labeled") else "ran",
                   lab["snapshot_id"])
            log(f"[{cfg.name}] iteration {i}: balancing {sel}")
            bal = balance(store, sel, run=lab["run_id"], **cfg.balance)
            record(i, "balance", sel, "ran", bal["snapshot_id"])
        train_step(i, sel)
    if cfg.baseline:
        _train_baseline(store, cfg, images, record, log)
    return {"name": cfg.name, "images_version": images, "steps": steps, "table": report(store, cfg.name)}


def _train_baseline(store: Store, cfg: LoopConfig, images: int, record, log) -> None:
    """The compute-matched supervised model: the final student's architecture on the labeled
    split with the students' options, for as many steps as the whole loop took."""
    name = baseline_name(cfg.name)
    if model_exists(store, name):
        log(f"[{cfg.name}] baseline {name} done before")
        return record(cfg.iterations, "baseline", name, "done before",
                      _run_snapshot(store, get_model_record(store, name)["run_id"]))
    loop_models = [get_model_record(store, model_name(cfg.name, i)) for i in range(cfg.iterations + 1)]
    steps = sum(trained_steps(m) for m in loop_models)
    opts = dict(train_options(cfg), steps=steps)
    tc = TrainConfig(name=name, arch=loop_models[-1]["arch"], images=str(images), **opts)
    resume = has_saved_state(store, name)
    log(f"[{cfg.name}] {'resuming' if resume else 'training'} the supervised baseline {name} "
        f"({tc.arch}, {steps} steps: the loop's total)")
    rec = train(store, tc, resume=resume)
    record(cfg.iterations, "baseline", name, "ran", rec["snapshot_id"])


def trained_steps(record: dict) -> int:
    """The optimiser steps a registered model trained for (0 when it records none)."""
    epochs = (record.get("metrics") or {}).get("epochs") or [{}]
    return int(epochs[-1].get("steps") or 0)


def _check(cfg: LoopConfig) -> None:
    check_options(cfg)
    if not cfg.models or any(not m for m in cfg.models):
        raise UsageError("--models needs at least one timm architecture (teacher first)")


def _pin_images(store: Store, cfg: LoopConfig) -> int:
    """The images snapshot of the loop: pinned by a tag at the first run, reused on resume."""
    tag = f"{cfg.name}-images"
    pinned = store.tags().get(tag)
    want = store.resolve(cfg.images) if cfg.images is not None else None
    if pinned is not None:
        if want is not None and want != pinned:
            raise UsageError(f"loop {cfg.name!r} runs on images@{pinned}, not {want}: pick another --name")
        return pinned
    snap = want if want is not None else store.resolve(None)
    store.tag(tag, snap)
    return snap


def _run_snapshot(store: Store, run_id: str | None) -> int | None:
    return snapshots_by_run(store).get(run_id) if run_id else None


def _selection_exists(store: Store, sel: str) -> bool:
    with store.reader() as con:
        return con.execute(f"SELECT 1 FROM selections WHERE selection = {name_literal(sel, 'selection')} LIMIT 1"
                           ).fetchone() is not None


def _selection_label_run(store: Store, sel: str) -> str | None:
    with store.reader() as con:
        return label_run_of(con, sel)


def _balance_snapshot(store: Store, sel: str) -> int | None:
    with store.reader() as con:
        run = balance_run(con, sel)
    return _run_snapshot(store, run["run_id"]) if run else None


def report(store: Store, name: str) -> list[dict]:
    """One row per iteration of loop NAME: model, parameters, steps, selection size,
    pseudo-label accuracy (where gold labels are hidden in the store) and test accuracy; then
    the compute-matched baseline (iteration None) when the loop has one.

    Each student row also says how it compares: ``vs_teacher`` and ``vs_baseline`` (test
    accuracy differences) and ``flag``, which names what it is below ("below its teacher",
    "below the baseline"): a student below either is not progress.
    """

    with store.reader() as con:
        rows = con.execute(read_sql("loop_report"),
                           {"prefix": model_name(name, ""), "baseline": baseline_name(name)}).fetchall()
        cols = [d[0] for d in con.description]
    table = [dict(zip(cols, r)) for r in rows]
    return compare_iterations(table)


def compare_iterations(table: list[dict]) -> list[dict]:
    """TABLE (loop_report rows) with ``total_steps``, ``vs_teacher``, ``vs_baseline`` and ``flag``."""
    accs = {r["iteration"]: r["test_acc"] for r in table}
    base = accs.get(None)
    total = 0
    for r in table:
        if r["iteration"] is not None:
            total += r["steps"] or 0
        r["total_steps"] = total if r["iteration"] is not None else r["steps"]
        teacher = accs.get(r["iteration"] - 1) if r["iteration"] else None
        r["vs_teacher"] = _diff(r["test_acc"], teacher)
        r["vs_baseline"] = _diff(r["test_acc"], base) if r["iteration"] else None
        below = [what for what, d in (("its teacher", r["vs_teacher"]), ("the baseline", r["vs_baseline"]))
                 if d is not None and d < 0]
        r["flag"] = ("below " + " and ".join(below)) if below else None
    return table


def _diff(a, b):
    return None if a is None or b is None else a - b
