"""Reproduction study: Noisy Student on Fashion-MNIST with 1,000 labels, and the paper's ablations.

    .venv/bin/python bench/ssl_study.py                       # CPU-sized models (about half an hour on 2 cores)
    .venv/bin/python bench/ssl_study.py --models resnet18,resnet26,resnet50,resnet50 --device cuda --tag gpu

One store (bench/_work/ssl-<tag>): the 1,000 labels (100 per class, seed 0), 59,000 unlabeled
images with hidden gold labels, 10,000 test images. Then, all through nsd.engine:

* the loop: teacher + 3 iterations of noised, growing students (``--models``);
* ablations of iteration 1, from the same label run of the same teacher, at the same step
  budget as the iteration-1 student: student without noise, hard instead of soft targets,
  no balancing (every confident image once, no per-class K);
* the supervised baseline: the final student's architecture trained on the same 1,000 labels
  for as many steps as the final student, with the same noise (a strong baseline: the paper's
  baselines use RandAugment too), and once more without noise.

Results go to bench/results/ssl-<tag>.json and .md. Re-running resumes: finished models are
read back from the store, not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nsd.engine.balance import balance
from nsd.engine.ingest import ingest
from nsd.engine.loop import LoopConfig, loop, model_name, selection_name
from nsd.engine.models import get_model_record, model_exists
from nsd.engine.store import Store
from nsd.engine.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="test_resnet,test_resnet,test_resnet,resnet10t",
                    help="teacher, then the students of iterations 1..3")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=2, help="student epochs over the selection")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unlabeled-ratio", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="cpu", help="names the store and the result files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    store = Store(ROOT / "_work" / f"ssl-{args.tag}")
    if not store.exists():
        store.init()
        ingest(store, "fashion-mnist", labeled_per_class=100, seed=args.seed, progress=False)
    common = dict(batch_size=args.batch_size, unlabeled_ratio=args.unlabeled_ratio, seed=args.seed,
                  device=args.device, workers=args.workers, progress=sys.stderr.isatty())
    models = tuple(args.models.split(","))
    t0 = time.time()
    cfg = LoopConfig(name="ns", models=models, iterations=args.iterations,
                     train=dict(common, epochs=args.epochs), teacher=dict(epochs=args.teacher_epochs, noise=False),
                     label=dict(device=None if args.device == "auto" else args.device, progress=False))
    out = loop(store, cfg)
    loop_s = time.time() - t0

    images = out["images_version"]
    first = get_model_record(store, model_name("ns", 1))
    first_steps = first["metrics"]["epochs"][-1]["steps"]
    label_run = _label_run_of(store, selection_name("ns", 1))

    def student(name: str, selection: str, steps: int, arch: str, **over) -> dict:
        if not model_exists(store, name):
            print(f"ablation {name}", file=sys.stderr)
            train(store, TrainConfig(name=name, arch=arch, selection=selection, images=str(images), steps=steps,
                                     **dict(common, **over)))
        return get_model_record(store, name)

    def selection(name: str, **opts) -> str:
        if not _selection_exists(store, name):
            balance(store, name, run=label_run, **opts)
        return name

    arch1, final = models[min(1, len(models) - 1)], model_name("ns", args.iterations)
    final_rec = get_model_record(store, final)
    rows = [_row("teacher", model_name("ns", 0), get_model_record(store, model_name("ns", 0)), "1k labels")]
    for i in range(1, args.iterations + 1):
        rows.append(_row(f"noisy student, iteration {i}", model_name("ns", i), get_model_record(store, model_name("ns", i)),
                         f"1k labels + {selection_name('ns', i)}"))
    abl = [
        ("iteration 1 without noise", student("abl-no-noise", selection_name("ns", 1), first_steps, arch1, noise=False),
         "1k labels + ns-sel1"),
        ("iteration 1 with hard labels", student("abl-hard", selection("abl-hard-sel", hard=True), first_steps, arch1),
         "1k labels + hard selection"),
        ("iteration 1 without balancing", student("abl-no-balance", selection(
            "abl-no-balance-sel", per_class=59000, duplicate=False), first_steps, arch1),
         "1k labels + all conf > 0.3, once"),
    ]
    rows += [_row(what, rec["model"], rec, data) for what, rec, data in abl]
    base = student("supervised", None, final_rec["metrics"]["epochs"][-1]["steps"], final_rec["arch"], noise=True)
    rows.append(_row("supervised baseline (same steps as final student, noised)", "supervised", base, "1k labels"))
    plain = student("supervised-no-noise", None, final_rec["metrics"]["epochs"][-1]["steps"], final_rec["arch"],
                    noise=False)
    rows.append(_row("supervised baseline without noise", "supervised-no-noise", plain, "1k labels"))

    result = {"command": " ".join(["bench/ssl_study.py", *sys.argv[1:]]), "models": models, "rows": rows,
              "loop_table": out["table"], "loop_seconds_this_run": round(loop_s, 1)}
    checks = _findings(rows, args.iterations)
    result["findings"] = checks
    out_dir = ROOT / "results"
    (out_dir / f"ssl-{args.tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"ssl-{args.tag}.md").write_text(_markdown(result))
    print(_markdown(result))


def _row(what, model, rec, data) -> dict:
    test = (rec.get("metrics") or {}).get("eval", {}).get("test", {})
    steps = (rec.get("metrics") or {}).get("epochs", [{}])[-1].get("steps")
    noise = rec.get("noise") or {}
    return {"run": what, "model": model, "arch": rec["arch"], "params": rec["num_params"], "data": data,
            "noise": "off" if not (noise.get("randaug_n") or noise.get("drop_rate") or noise.get("drop_path_rate"))
            else f"RA {noise['randaug_n']}/{noise['randaug_m']:g}, drop {noise['drop_rate']}, "
                 f"drop-path {noise['drop_path_rate']}",
            "steps": steps, "test_acc": test.get("top1")}


def _findings(rows, iterations) -> dict:
    by = {r["model"]: r["test_acc"] for r in rows}
    its = [by[f"ns-m{i}"] for i in range(iterations + 1)]
    final = its[-1]
    return {
        "final_minus_supervised_points": round(100 * (final - by["supervised"]), 2),
        "final_beats_supervised_by_4_points": final - by["supervised"] >= 0.04,
        "final_minus_unnoised_supervised_points": round(100 * (final - by["supervised-no-noise"]), 2),
        "each_iteration_at_least_as_good": all(b >= a for a, b in zip(its, its[1:])),
        "noise_helps_iteration_1": by["ns-m1"] > by["abl-no-noise"],
        "soft_beats_hard_iteration_1": by["ns-m1"] > by["abl-hard"],
        "balancing_helps_iteration_1": by["ns-m1"] > by["abl-no-balance"],
    }


def _markdown(result) -> str:
    lines = [f"    {result['command']}", "",
             "| run | model | arch | params | data | noise | steps | test acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        acc = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}%"
        lines.append(f"| {r['run']} | {r['model']} | {r['arch']} | {r['params'] / 1e6:.2f}M | {r['data']} | "
                     f"{r['noise']} | {r['steps']} | {acc} |")
    lines += ["", "Pseudo labels of each iteration (accuracy against the hidden gold labels):", "",
              "| iteration | teacher -> student | selection size | pseudo-label acc | selected acc | test acc |",
              "| --- | --- | --- | --- | --- | --- |"]
    prev = None
    for r in result["loop_table"]:
        pct = (lambda v: "-" if v is None else f"{100 * v:.2f}%")
        size = "-" if r["selection_size"] is None else f"{r['selection_size']:,}"
        lines.append(f"| {r['iteration']} | {prev or '-'} -> {r['model']} | {size} | {pct(r['pseudo_label_acc'])} | "
                     f"{pct(r['selected_acc'])} | {pct(r['test_acc'])} |")
        prev = r["model"]
    lines += ["", "Findings: " + ", ".join(f"{k} = {v}" for k, v in result["findings"].items()), ""]
    return "\n".join(lines)


def _label_run_of(store, sel):
    with store.reader() as con:
        return con.execute("SELECT any_value(label_run) FROM selections WHERE selection = ?", [sel]).fetchone()[0]


def _selection_exists(store, sel):
    with store.reader() as con:
        return con.execute("SELECT 1 FROM selections WHERE selection = ? LIMIT 1", [sel]).fetchone() is not None


if __name__ == "__main__":
    main()
