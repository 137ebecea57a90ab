"""Reproduction study: Noisy Student on Fashion-MNIST with 1,000 labels, over several seeds.

    .venv/bin/python bench/ssl_study.py                  # CPU-sized models, 3 seeds (about 2 hours on 2 cores)
    .venv/bin/python bench/ssl_study.py --models resnet18,resnet26,resnet50,resnet50 --device cuda --tag gpu

One store (bench/_work/ssl-<tag>): the 1,000 labels (100 per class, ingest seed 0), 59,000
unlabeled images with hidden gold labels, 10,000 test images. Then, all through nsd.engine:

* per training seed, the loop ``s<seed>``: a teacher trained with noise (the best supervised
  model we can make), then 3 iterations of label (no noise) -> balance -> noised student, the
  students growing (``--models``), plus ``s<seed>-baseline``: the final student's architecture
  trained on the 1,000 labels alone with the same noise and as many steps (``nsd loop --baseline``);
* on the first seed, the ablations of iteration 1 at the iteration-1 student's step budget:
  student without noise, hard targets, no balancing, and a teacher trained without noise
  (its own label run and selection); and the final architecture's baseline without noise.

Results go to bench/results/ssl-<tag>.json and .md. Re-running resumes: finished models are
read back from the store, not retrained.
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
from nsd.engine.loop import LoopConfig, baseline_name, loop, model_name, selection_name
from nsd.engine.models import get_model_record, model_exists
from nsd.engine.store import Store
from nsd.engine.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="test_resnet,test_resnet,test_resnet,test_resnet",
                    help="teacher, then the students of iterations 1..3")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--steps", type=int, default=600, help="steps of each student (and of the baseline)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unlabeled-ratio", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="cpu", help="names the store and the result files")
    args = ap.parse_args()

    store = Store(ROOT / "_work" / f"ssl-{args.tag}")
    if not store.exists():
        store.init()
        ingest(store, "fashion-mnist", labeled_per_class=100, seed=0, progress=False)
    models, seeds = tuple(args.models.split(",")), [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    rows, tables = [], {}

    def common(seed):
        return dict(batch_size=args.batch_size, unlabeled_ratio=args.unlabeled_ratio, seed=seed,
                    device=args.device, workers=args.workers, progress=sys.stderr.isatty())

    for seed in seeds:
        name = f"s{seed}"
        cfg = LoopConfig(name=name, models=models, iterations=args.iterations, baseline=True,
                         train=dict(common(seed), steps=args.steps),
                         teacher=dict(steps=None, epochs=args.teacher_epochs),
                         label=dict(device=None if args.device == "auto" else args.device, progress=False))
        out = loop(store, cfg)
        tables[name] = out["table"]
        rows += [_row(seed, "teacher" if r["iteration"] == 0 else "supervised baseline (final arch, same noise "
                      "and steps)" if r["iteration"] is None else f"noisy student, iteration {r['iteration']}",
                      get_model_record(store, r["model"]), "1k labels" + (f" + {r['selection']}" if r["selection"]
                                                                         else "")) for r in out["table"]]
        _write(args, models, seeds, rows, tables, t0)  # results so far, seed by seed
    if not args.no_ablations:  # after every seed's comparison: on the first seed
        rows += _ablations(store, store.tags()[f"s{seeds[0]}-images"], f"s{seeds[0]}", models,
                           common(seeds[0]), args)
    print(_write(args, models, seeds, rows, tables, t0))


def _write(args, models, seeds, rows, tables, t0) -> str:
    done = [s for s in seeds if f"s{s}" in tables]
    result = {"command": " ".join(["bench/ssl_study.py", *sys.argv[1:]]), "models": models, "seeds": done,
              "rows": rows, "loop_tables": tables, "seconds_this_run": round(time.time() - t0, 1)}
    result["summary"] = _summary(rows, done, args.iterations)
    out_dir = ROOT / "results"
    (out_dir / f"ssl-{args.tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"ssl-{args.tag}.md").write_text(_markdown(result))
    return _markdown(result)


def _ablations(store, images, name, models, common, args) -> list[dict]:
    """Iteration 1 of loop NAME with one ingredient changed each, at the same step budget."""
    run1 = _label_run_of(store, selection_name(name, 1))
    arch1, final = models[min(1, len(models) - 1)], get_model_record(store, model_name(name, args.iterations))

    def student(model, selection, arch=arch1, **over):
        if not model_exists(store, model):
            print(f"ablation {model}", file=sys.stderr)
            train(store, TrainConfig(name=model, arch=arch, selection=selection, images=str(images),
                                     **dict(common, steps=args.steps, **over)))
        return get_model_record(store, model)

    def selection(sel, run, **opts):
        if not _selection_exists(store, sel):
            balance(store, sel, run=run, **opts)
        return sel

    out = [
        _row(0, "iteration 1 without noise", student("abl-no-noise", selection_name(name, 1), noise=False),
             "1k labels + s0-sel1"),
        _row(0, "iteration 1 with hard labels", student("abl-hard", selection("abl-hard-sel", run1, hard=True)),
             "1k labels + hard selection"),
        _row(0, "iteration 1 without balancing", student(
            "abl-no-balance", selection("abl-no-balance-sel", run1, per_class=59000, duplicate=False)),
            "1k labels + all conf > 0.3, once"),
    ]
    # A teacher without noise (the previous default), its labels, and the noised student on them.
    if not model_exists(store, "abl-plain-teacher"):
        train(store, TrainConfig(name="abl-plain-teacher", arch=models[0], images=str(images), noise=False,
                                 epochs=args.teacher_epochs, **common))
    if not _selection_exists(store, "abl-plain-teacher-sel"):
        lab = label(store, "abl-plain-teacher", images=images, progress=False)
        balance(store, "abl-plain-teacher-sel", run=lab["run_id"])
    out.append(_row(0, "teacher without noise", get_model_record(store, "abl-plain-teacher"), "1k labels"))
    out.append(_row(0, "iteration 1 from the teacher without noise",
                    student("abl-plain-teacher-student", "abl-plain-teacher-sel"),
                    "1k labels + abl-plain-teacher-sel"))
    out.append(_row(0, "supervised baseline without noise (final arch)",
                    student("abl-supervised-no-noise", None, arch=final["arch"], noise=False), "1k labels"))
    return out


def _row(seed, what, rec, data) -> dict:
    test = (rec.get("metrics") or {}).get("eval", {}).get("test", {})
    steps = (rec.get("metrics") or {}).get("epochs", [{}])[-1].get("steps")
    noise = rec.get("noise") or {}
    on = noise.get("randaug_n") or noise.get("drop_rate") or noise.get("drop_path_rate")
    return {"seed": seed, "run": what, "model": rec["model"], "arch": rec["arch"], "params": rec["num_params"],
            "data": data, "steps": steps, "test_acc": test.get("top1"),
            "noise": "off" if not on else f"RA {noise['randaug_n']}/{noise['randaug_m']:g}, drop {noise['drop_rate']}, "
                                          f"drop-path {noise['drop_path_rate']}, erase {noise.get('random_erasing', 0)}"}


def _summary(rows, seeds, iterations) -> dict:
    acc = {r["model"]: r["test_acc"] for r in rows}
    per_seed = {s: [acc[model_name(f"s{s}", i)] for i in range(iterations + 1)] for s in seeds}
    finals = [v[-1] for v in per_seed.values()]
    bases = [acc[baseline_name(f"s{s}")] for s in seeds]
    gaps = [100 * (f - b) for f, b in zip(finals, bases)]

    def ms(xs):
        return {"mean": round(100 * statistics.mean(xs), 2),
                "std": round(100 * statistics.stdev(xs), 2) if len(xs) > 1 else None}

    out = {
        "iterations_mean": [ms([per_seed[s][i] for s in seeds]) for i in range(iterations + 1)],
        "final_student": ms(finals), "baseline": ms(bases),
        "final_minus_baseline_points": {"mean": round(statistics.mean(gaps), 2),
                                        "std": round(statistics.stdev(gaps), 2) if len(gaps) > 1 else None,
                                        "per_seed": [round(g, 2) for g in gaps]},
        "final_beats_baseline_by_4_points": statistics.mean(gaps) >= 4.0,
        # The teacher is a supervised model too (same noise, more steps): with students of the
        # teacher's architecture, the stronger of the two is the strongest supervised baseline.
        "final_minus_strongest_supervised_points": [
            round(100 * (per_seed[s][-1] - max(per_seed[s][0], acc[baseline_name(f"s{s}")])), 2)
            for s in seeds if acc[model_name(f"s{s}", 0)] is not None],
        "each_iteration_at_least_as_good_every_seed": all(
            all(b >= a for a, b in zip(v, v[1:])) for v in per_seed.values()),
    }
    if "abl-no-noise" in acc:
        first = acc[model_name(f"s{seeds[0]}", 1)]
        out["iteration_1_seed_%d" % seeds[0]] = {
            "noisy_student": first, "without_noise": acc["abl-no-noise"], "hard_labels": acc["abl-hard"],
            "no_balancing": acc["abl-no-balance"], "teacher_without_noise": acc["abl-plain-teacher-student"]}
    return out


def _markdown(result) -> str:
    pct = (lambda v: "-" if v is None else f"{100 * v:.2f}%")  # noqa: E731
    lines = [f"    {result['command']}", "",
             "| seed | run | model | arch | params | data | noise | steps | test acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['seed']} | {r['run']} | {r['model']} | {r['arch']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['data']} | {r['noise']} | {r['steps']} | {pct(r['test_acc'])} |")
    for name, table in result["loop_tables"].items():
        lines += ["", f"Loop {name}: pseudo labels of each iteration (accuracy against the hidden gold labels):", "",
                  "| iteration | model | selection size | pseudo-label acc | selected acc | test acc |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in table:
            size = "-" if r["selection_size"] is None else f"{r['selection_size']:,}"
            it = "baseline" if r["iteration"] is None else r["iteration"]
            lines.append(f"| {it} | {r['model']} | {size} | {pct(r['pseudo_label_acc'])} | "
                         f"{pct(r['selected_acc'])} | {pct(r['test_acc'])} |")
    lines += ["", "Summary (test accuracy in %, mean and standard deviation over seeds):", "", "```",
              json.dumps(result["summary"], indent=2), "```", ""]
    return "\n".join(lines)


def _label_run_of(store, sel):
    with store.reader() as con:
        return con.execute("SELECT any_value(label_run) FROM selections WHERE selection = ?", [sel]).fetchone()[0]


def _selection_exists(store, sel):
    with store.reader() as con:
        return con.execute("SELECT 1 FROM selections WHERE selection = ? LIMIT 1", [sel]).fetchone() is not None


if __name__ == "__main__":
    main()
