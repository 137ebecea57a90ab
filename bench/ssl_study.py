"""Noisy Student against supervised training at equal compute: the study behind nsd's defaults.

    .venv/bin/python bench/ssl_study.py --dataset fmnist                 # 1,000 labels, 3 seeds
    .venv/bin/python bench/ssl_study.py --dataset digits --hflip 0       # 100 labels (pip install -e '.[study]')
    .venv/bin/python bench/ssl_study.py --dataset fmnist --ablations scratch,hard --seeds 0

One store per data set and labels-per-class (bench/_work/study-<dataset>-<n>): Fashion-MNIST
(`nsd ingest fashion-mnist`) or scikit-learn's handwritten digits (bench/digits.py), N labeled
images per class, the rest of the training images as the pool (gold labels hidden), the test
split. Then, per training seed s, all through nsd.engine:

* the loop ``s<s>`` with `nsd loop`'s defaults (engine/loop.py: budgets, student init) and its
  compute-matched baseline (the final architecture on the labels alone for the loop's total steps);
* the supervised curve: that architecture and those options on the labels alone at each
  iteration's cumulative budget (teacher + i students). The teacher is its first point when
  the architectures match, the baseline its last;
* the ablations of iteration 1: one student of the loop's own teacher and labels per row, with
  one ingredient changed (``--ablations``), to compare with the loop's iteration 1.

Results: bench/results/study-<dataset>-<n>.json and .md, rewritten after every model, so a
stopped study keeps what it finished; re-running resumes (finished models are read back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from nsd.engine.balance import balance
from nsd.engine.ingest import ingest
from nsd.engine.label import label
from nsd.engine.loop import (LoopConfig, arch_of, baseline_name, loop, model_name, selection_name,
                             train_options, trained_steps)
from nsd.engine.models import get_model_record, model_exists
from nsd.engine.store import Store
from nsd.engine.train import TrainConfig, has_saved_state, train

ROOT = Path(__file__).resolve().parent

# Iteration 1 with one ingredient changed: the TrainConfig overrides of the student, and the
# options of its own selection (None: the loop's selection).
ABLATIONS = {
    "scratch": ("student from scratch (not from its teacher)", {"init_from": None}, None),
    "hard": ("hard pseudo labels (one-hot)", {}, {"hard": True}),
    "no-noise": ("student without noise", {"noise": False}, None),
    "ratio1": ("unlabeled ratio 1 (not 3)", {"unlabeled_ratio": 1}, None),
    "ema": ("EMA of the student's weights (0.999)", {"ema": 0.999}, None),
    "no-balance": ("no balancing (every pseudo label > 0.3, once)", {}, {"per_class": 10**6, "duplicate": False}),
    "threshold0.8": ("confidence threshold 0.8", {}, {"threshold": 0.8}),
    # fewer, surer pseudo labels: the K most confident per class (the default K is the median
    # class, about all of the pool)
    "k1500": ("the 1,500 most confident per class", {}, {"per_class": 1500}),
    "k3000": ("the 3,000 most confident per class", {}, {"per_class": 3000}),
    "sharpen0.5": ("sharpened soft labels (T = 0.5)", {}, {"sharpen": 0.5}),
    "lr1e-3": ("student peak learning rate 1e-3 (not 2e-3)", {"lr": 1e-3}, None),
    # not a recipe: the pool's true labels, the ceiling of any pseudo labels at this budget
    "oracle": ("oracle: the pool's TRUE labels instead of pseudo labels", {},
               {"sql_file": str(ROOT / "oracle_selection.sql")}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fmnist", "digits"), default="fmnist")
    ap.add_argument("--labels-per-class", type=int, default=None, help="default: 100 (fmnist), 10 (digits)")
    ap.add_argument("--models", default="test_resnet", help="teacher, then the students (the last repeats)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ablations", default="scratch,hard,no-noise", help=f"of: {', '.join(ABLATIONS)}; '' for none")
    ap.add_argument("--teacher-steps", type=int, default=None, help="default: the loop's")
    ap.add_argument("--steps", type=int, default=None, help="of each student; default: the loop's")
    ap.add_argument("--tag", default="", help="suffix of the store and result names (another budget or model)")
    ap.add_argument("--hflip", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    per_class = args.labels_per_class or (100 if args.dataset == "fmnist" else 10)
    tag = f"{args.dataset}-{per_class}{'-' + args.tag if args.tag else ''}"
    store = _store(args.dataset, per_class, ROOT / "_work" / f"study-{tag}")
    seeds = [int(s) for s in args.seeds.split(",")]
    ablations = [a for a in args.ablations.split(",") if a]
    result = {"command": " ".join(["bench/ssl_study.py", *sys.argv[1:]]), "dataset": args.dataset,
              "labels_per_class": per_class, "seeds": {}, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = ROOT / "results" / f"study-{tag}"
    if out.with_suffix(".json").exists():  # keep what an earlier, stopped run measured
        result["seeds"] = json.loads(out.with_suffix(".json").read_text())["seeds"]
    for seed in seeds:  # the loops and curves of every seed first: they answer the main question
        cfg = _loop_config(args, seed, baseline=True)
        row = result["seeds"].setdefault(str(seed), {})
        row["loop"] = [_slim(r) for r in loop(store, cfg)["table"]]
        _write(out, result)
        row["curve"] = _curve(store, cfg, row["loop"], lambda: _write(out, result))
        _write(out, result)
    for name in ablations:
        for seed in seeds:
            cfg = _loop_config(args, seed)
            result["seeds"][str(seed)].setdefault("ablations", {})[name] = _ablation(store, cfg, name)
            _write(out, result)
    print(_markdown(result))


def _loop_config(args, seed: int, baseline: bool = False) -> LoopConfig:
    return LoopConfig(name=f"s{seed}", models=tuple(args.models.split(",")), iterations=args.iterations,
                      baseline=baseline, device=args.device, teacher_steps=args.teacher_steps,
                      train=dict(seed=seed, hflip=args.hflip, workers=args.workers, steps=args.steps, progress=False),
                      label=dict(progress=False))


def _store(dataset: str, per_class: int, path: Path) -> Store:
    store = Store(path)
    if not store.exists():
        store.init()
        if dataset == "fmnist":
            ingest(store, "fashion-mnist", labeled_per_class=per_class, seed=0, progress=False)
        else:
            sys.path.insert(0, str(ROOT))
            from digits import write_digits

            folders = write_digits(path.parent / "digits-images")
            ingest(store, str(folders / "train"), labeled_per_class=per_class, seed=0, progress=False)
            ingest(store, str(folders / "test"), split="test", progress=False)
    return store


def _curve(store: Store, cfg: LoopConfig, table: list[dict], save) -> dict:
    """Test accuracy of the supervised model at each iteration's cumulative budget."""
    final_arch = arch_of(cfg.models, cfg.iterations)
    points = {}
    for r in table:
        if r["iteration"] is None:
            continue
        steps = r["total_steps"]
        if r["iteration"] == 0 and r["arch"] == final_arch:
            points[steps] = r["model"]  # the teacher is the supervised model at its budget
        elif r["iteration"] == cfg.iterations:
            points[steps] = baseline_name(cfg.name)
        else:
            name = f"{cfg.name}-sup{steps}"
            if not model_exists(store, name):
                print(f"supervised {name}", file=sys.stderr)
                train(store, TrainConfig(name=name, arch=final_arch, images=str(store.tags()[f"{cfg.name}-images"]),
                                         **dict(train_options(cfg), steps=steps)), resume=has_saved_state(store, name))
                save()
            points[steps] = name
    return {str(steps): _acc(store, name) for steps, name in sorted(points.items())}


def _ablation(store: Store, cfg: LoopConfig, name: str) -> float:
    """Test accuracy of iteration 1 of loop CFG with ablation NAME."""
    _, over, selecting = ABLATIONS[name]
    teacher, sel, model = model_name(cfg.name, 0), selection_name(cfg.name, 1), f"{cfg.name}-a-{name}"
    if selecting is not None:
        own = f"{cfg.name}-a-{name}-sel"
        if not _selection_exists(store, own):
            balance(store, own, run=_label_run_of(store, sel), **selecting)
        sel = own
    if not model_exists(store, model):
        print(f"ablation {model}", file=sys.stderr)
        opts = dict(train_options(cfg), init_from=teacher if cfg.student_init == "teacher" else None)
        train(store, TrainConfig(name=model, arch=arch_of(cfg.models, 1), selection=sel,
                                 images=str(store.tags()[f"{cfg.name}-images"]), **dict(opts, **over)),
              resume=has_saved_state(store, model))  # a stopped study continues where it was
    return _acc(store, model)


def _slim(r: dict) -> dict:
    keep = ("iteration", "model", "arch", "params", "steps", "total_steps", "selection_size", "pseudo_label_acc",
            "selected_acc", "test_acc", "vs_teacher", "vs_baseline", "flag")
    return {k: r.get(k) for k in keep}


def _acc(store: Store, model: str) -> float:
    return get_model_record(store, model)["metrics"]["eval"]["test"]["top1"]


def _write(out: Path, result: dict) -> None:
    result["summary"] = _summary(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))


def _ms(xs: list[float]) -> dict:
    return {"mean": round(100 * statistics.mean(xs), 2), "std": round(100 * statistics.stdev(xs), 2) if len(xs) > 1 else None,
            "n": len(xs)}


def _summary(result: dict) -> dict:
    done = {s: r for s, r in result["seeds"].items() if r.get("curve")}
    if not done:
        return {}
    iters = [[x["test_acc"] for x in r["loop"] if x["iteration"] is not None] for r in done.values()]
    best = [max(r["curve"].values()) for r in done.values()]
    gaps = [it[-1] - b for it, b in zip(iters, best)]
    out = {
        "seeds": sorted(done),
        "iterations": [_ms([it[i] for it in iters]) for i in range(len(iters[0]))],
        "curve": {steps: _ms([r["curve"][steps] for r in done.values()]) for steps in next(iter(done.values()))["curve"]},
        "best_supervised": _ms(best),
        "final_minus_best_supervised_points": [round(100 * g, 2) for g in gaps],
        "final_2_points_above_best_supervised_every_seed": all(g >= 0.02 for g in gaps),
        "each_iteration_at_least_as_good_every_seed": all(all(b >= a for a, b in zip(it, it[1:])) for it in iters),
    }
    abl = {}
    for name in ABLATIONS:
        pairs = [(r["ablations"][name], r["loop"][1]["test_acc"]) for r in done.values() if name in r.get("ablations", {})]
        if pairs:
            abl[name] = {"acc": _ms([a for a, _ in pairs]), "minus_default": _ms([a - d for a, d in pairs])}
    out["ablations"] = abl
    return out


def _markdown(result: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    pts = lambda v: "-" if v is None else f"{100 * v:+.2f}"  # noqa: E731
    ms = lambda m: f"{m['mean']:.2f} ± {m['std'] if m['std'] is not None else 0:.2f}"  # noqa: E731
    lines = [f"# Study: {result['dataset']}, {result['labels_per_class']} labels per class", "",
             f"    {result['command']}", "", f"Started {result['started']}.", ""]
    for seed, r in result["seeds"].items():
        lines += [f"## Seed {seed}", "", "| iter | model | steps | total steps | selection | pseudo-label acc | test acc "
                  "| vs teacher | vs baseline | flag |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in r.get("loop", []):
            lines.append(f"| {'baseline' if x['iteration'] is None else x['iteration']} | {x['model']} | {x['steps']} | "
                         f"{x['total_steps']} | {x['selection_size'] or '-'} | {pct(x['pseudo_label_acc'])} | "
                         f"{pct(x['test_acc'])} | {pts(x['vs_teacher'])} | {pts(x['vs_baseline'])} | {x['flag'] or ''} |")
        if r.get("curve"):
            lines += ["", "Supervised curve (steps: test acc): " + ", ".join(f"{s}: {pct(a)}" for s, a in r["curve"].items())]
        if r.get("ablations"):
            lines += ["", "Iteration-1 ablations: " + ", ".join(f"{n}: {pct(a)}" for n, a in r["ablations"].items())]
        lines.append("")
    s = result.get("summary") or {}
    if s:
        lines += ["## Summary (test accuracy %, mean ± std over seeds " + ", ".join(s["seeds"]) + ")", "",
                  "| | " + " | ".join(f"iteration {i}" for i in range(len(s["iterations"]))) + " |",
                  "| --- |" + " --- |" * len(s["iterations"]),
                  "| noisy student loop | " + " | ".join(ms(m) for m in s["iterations"]) + " |", "",
                  "| supervised, steps | " + " | ".join(s["curve"]) + " |", "| --- |" + " --- |" * len(s["curve"]),
                  "| test acc | " + " | ".join(ms(m) for m in s["curve"].values()) + " |", "",
                  f"Final student minus the best point of the supervised curve, per seed: "
                  f"{s['final_minus_best_supervised_points']} points (target: +2 on every seed: "
                  f"{'met' if s['final_2_points_above_best_supervised_every_seed'] else 'missed'}); every iteration at "
                  f"least as good as the one before on every seed: {s['each_iteration_at_least_as_good_every_seed']}.", ""]
        if s["ablations"]:
            lines += ["### Ablations of iteration 1 (each row changes one thing; the default is the loop's iteration 1)",
                      "", "| ablation | seeds | test acc | minus the default (points) |", "| --- | --- | --- | --- |",
                      f"| default (loop iteration 1) | {len(s['seeds'])} | {ms(s['iterations'][1])} | - |"]
            for name, a in s["ablations"].items():
                lines.append(f"| {ABLATIONS[name][0]} | {a['acc']['n']} | {ms(a['acc'])} | {ms(a['minus_default'])} |")
            lines.append("")
    return "\n".join(lines)


def _label_run_of(store: Store, sel: str) -> str:
    with store.reader() as con:
        return con.execute("SELECT any_value(label_run) FROM selections WHERE selection = ?", [sel]).fetchone()[0]


def _selection_exists(store: Store, sel: str) -> bool:
    with store.reader() as con:
        return con.execute("SELECT 1 FROM selections WHERE selection = ? LIMIT 1", [sel]).fetchone() is not None


if __name__ == "__main__":
    main()
