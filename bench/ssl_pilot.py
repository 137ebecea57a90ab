"""The single-seed pilot that chose what bench/ssl_study.py then measures over 3 seeds.

    .venv/bin/python bench/ssl_pilot.py      # about 40 minutes on 2 cores; resumes by model name

Fashion-MNIST, 1,000 labels (ingest seed 0), test_resnet everywhere, training seed 0, default
noise. One teacher of 2,400 steps (``T2400``) and its selection (``selT``, default balance);
then students of that teacher with one thing changed each, chains of students, the oracle
(the pool's true labels) and the supervised curve. Rows print as JSON lines; the results and
the conclusions are in bench/results/study-pilot.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from nsd.engine.balance import balance
from nsd.engine.ingest import ingest
from nsd.engine.label import label
from nsd.engine.loop import _selection_exists, _selection_label_run
from nsd.engine.models import get_model_record, model_exists
from nsd.engine.store import Store
from nsd.engine.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent
store = Store(ROOT / "_work" / "pilot")


def run(name: str, **options) -> None:
    if not model_exists(store, name):
        train(store, TrainConfig(name=name, arch="test_resnet", progress=False, workers=2, seed=0, **options))
    acc = get_model_record(store, name)["metrics"]["eval"]["test"]["top1"]
    print(json.dumps({"model": name, "test_acc": acc, **options}), flush=True)


def selection(name: str, teacher: str | None = None, of: str | None = None, **options) -> str:
    """Selection NAME from a new label run of TEACHER, or from the label run behind selection OF."""
    if not _selection_exists(store, name):
        run_id = label(store, teacher, progress=False)["run_id"] if teacher else _selection_label_run(store, of)
        balance(store, name, run=run_id, **options)
    return name


def main() -> None:
    if not store.exists():
        store.init()
        ingest(store, "fashion-mnist", labeled_per_class=100, seed=0, progress=False)
    run("T2400", steps=2400)
    sel = selection("selT", "T2400")
    run("S-init-1200", steps=1200, selection=sel, init_from="T2400")
    run("Sup3600", steps=3600)
    run("S-scratch-1200", steps=1200, selection=sel)
    run("S-init-hard-1200", steps=1200, selection=selection("selT-hard", of=sel, hard=True), init_from="T2400")
    run("S-init-ema-1200", steps=1200, selection=sel, init_from="T2400", ema=0.998)
    run("S2-init-1200", steps=1200, selection=selection("sel2", "S-init-1200"), init_from="S-init-1200")
    run("S-init-r7-1200", steps=1200, selection=sel, init_from="T2400", unlabeled_ratio=7)
    run("S3-init-1200", steps=1200, selection=selection("sel3", "S2-init-1200"), init_from="S2-init-1200")
    run("Sup6000", steps=6000)
    oracle = selection("oracle", of=sel, sql_file=str(ROOT / "oracle_selection.sql"))
    run("S-oracle-1200", steps=1200, selection=oracle, init_from="T2400")
    run("S-init-lr1e-3-1200", steps=1200, selection=sel, init_from="T2400", lr=1e-3)
    prev = "T2400"
    for i in (1, 2):  # students of 600 steps: twice the relabeling for the same steps
        run(f"c600-m{i}", steps=600, selection=selection(f"c600-sel{i}", prev), init_from=prev)
        prev = f"c600-m{i}"


if __name__ == "__main__":
    main()
