"""`nsd loop` and `nsd lineage`: thin wrappers over nsd.engine.loop and nsd.engine.lineage.

`nsd loop` composes the declared options of the loop, `nsd train`, `nsd label` and `nsd
balance` (each declared once, beside its default) and passes them on; it names the ones it
leaves out, renames the one clash (--label-batch-size) and gives the students' budget its own
default and help. A new option of train, label or balance is a loop option too.
"""

from __future__ import annotations

import dataclasses

import click

from nsd.cli.main import console, echo_json, get_store
from nsd.cli.options import Options
from nsd.engine.balance import BalanceParams
from nsd.engine.label import LabelParams
from nsd.engine.loop import STUDENT_STEPS, LoopConfig
from nsd.engine.train import TrainConfig

LOOP = Options(LoopConfig, defaults={"models": dataclasses.MISSING})
# The loop names the models, pins the images and sets the device itself; the rest of a
# run's options apply to every student (and to the teacher, but for its budget).
LOOP_TRAIN = Options(
    TrainConfig, exclude=("name", "arch", "selection", "images", "device", "pretrained_file", "init_from",
                          "eval_split", "save_every", "progress"),
    defaults={"epochs": None},
    helps={"epochs": "Epochs of each student: passes over the labeled split, as a teacher's (the selection's "
                     f"size does not change it) [default: {STUDENT_STEPS:,} steps].",
           "steps": "Steps of each student (instead of epochs).",
           "noise": "All student noise on/off [default: on]."})
LOOP_LABEL = Options(LabelParams, exclude=("device", "num_workers", "progress"),
                     rename={"batch_size": "label_batch_size"},
                     helps={"calibrate": "Fit each teacher's T on the val split (nsd label --calibrate)."})
LOOP_BALANCE = Options(BalanceParams, exclude=("labels", "run"))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


@click.command()
@LOOP
@LOOP_TRAIN
@LOOP_LABEL
@LOOP_BALANCE
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the steps and the final table as JSON.")
@click.pass_context
def loop(ctx, no_progress, as_json, **options):
    """Run Noisy Student: train a teacher on the labeled split, then per iteration label the
    pool (no noise), balance, and train a noised student that becomes the next teacher.

    Every step is one snapshot tagged NAME-it<i>-<step>. Run the same command again to resume
    an interrupted loop at the step it stopped in. An epoch is a pass over the labeled split,
    for teacher and students alike. With --baseline the table ends with the compute-matched
    yardstick: the final student's architecture on the labels alone, same options, for the
    loop's total steps. Each student is shown against its teacher and that baseline; one below
    either is flagged (and warned about on stderr), never presented as progress.

    Example:

    \b
        nsd loop --name fmnist --models test_resnet,test_resnet,resnet10t --iterations 2 --baseline
    """
    from nsd.engine.loop import loop as run_loop

    progress = not no_progress
    cfg = LoopConfig(**LOOP.take(options), train=dict(LOOP_TRAIN.take(options), progress=progress),
                     label=dict(LOOP_LABEL.take(options), progress=progress), balance=LOOP_BALANCE.take(options))
    out = run_loop(get_store(ctx), cfg, log=lambda msg: click.echo(msg, err=True))
    for r in out["table"]:
        if r["flag"]:  # never presented as progress
            click.echo(f"warning: {r['model']} ({_pct(r['test_acc'])}) is {r['flag']}", err=True)
    if as_json:
        return echo_json(out)
    print_report(out["table"], title=f"loop {cfg.name} (images@{out['images_version']})")


def print_report(rows: list[dict], title: str | None = None) -> None:
    """The loop's table: one row per iteration (selection size counts the copies), each student
    against its teacher and the compute-matched baseline."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("iter", "model", "arch", "params", "steps", "total steps", "selection", "pseudo-label acc",
                "test acc", "vs teacher", "vs baseline", "flag"):
        table.add_column(col, justify="left" if col in ("model", "arch", "flag") else "right", no_wrap=True)
    for r in rows:
        table.add_row("baseline" if r["iteration"] is None else str(r["iteration"]), r["model"], r["arch"],
                      _millions(r["params"]), _count(r["steps"]), _count(r["total_steps"]),
                      _count(r["selection_size"]), _pct(r["pseudo_label_acc"]), _pct(r["test_acc"]),
                      _points(r["vs_teacher"]), _points(r["vs_baseline"]), r["flag"] or "")
    console(min_width=200).print(table)


def _count(n) -> str:
    return "-" if n is None else f"{n:,}"


def _points(d) -> str:
    return "-" if d is None else f"{100 * d:+.2f}"


def _millions(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON.")
@click.pass_context
def lineage(ctx, model, as_json):
    """Trace MODEL back: model, selection, label run, teacher, ... labeled data, with snapshots.

    Example:

    \b
        nsd lineage fmnist-m2
    """
    from rich.table import Table

    from nsd.engine.lineage import lineage as trace

    chain = trace(get_store(ctx), model)
    if as_json:
        return echo_json(chain)
    table = Table(title=f"lineage of {model}", title_justify="left")
    for col in ("", "kind", "name", "snapshot", "details"):
        table.add_column(col)
    for depth, link in enumerate(chain):
        table.add_row("<-" if depth else "", link["kind"], link["name"],
                      "-" if link.get("snapshot") is None else str(link["snapshot"]), _details(link))
    console(min_width=120).print(table)


def _details(link: dict) -> str:
    kind = link["kind"]
    if kind == "model":
        acc = f", test {_pct(link['test_acc'])}" if link.get("test_acc") is not None else ""
        return f"{link.get('arch')}, {link.get('num_params') or 0:,} params{acc}"
    if kind == "selection":
        return f"{link['rows']:,} images, {link['copies'] or 0:,} with copies, from {link['label_run']}"
    if kind == "label_run":
        return f"{link['rows']:,} pseudo labels by {link['teacher']}"
    if kind == "labeled_data":
        return f"{link['rows']:,} labeled images"
    return link.get("note", "")
