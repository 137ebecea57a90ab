"""`nsd loop` and `nsd lineage`: thin wrappers over nsd.engine.loop and nsd.engine.lineage.

`nsd loop` takes the options of `nsd train`, `nsd label` and `nsd balance` and passes them on;
options that two commands share a name for are prefixed (--label-batch-size, --teacher-epochs).
"""

from __future__ import annotations

import click

from nsd.cli.main import console, echo_json, get_store
from nsd.cli.types import MAX_BATCH, MAX_SHARD, MAX_TOP_K, finite, sharpen_type, temperature_type
from nsd.cli.train_cmds import range_type, training_options
from nsd.engine.balance import BalanceParams
from nsd.engine.label import LabelParams
from nsd.engine.loop import STUDENT_STEPS, TEACHER_STEPS, LoopConfig
from nsd.engine.params import MAX_PER_CLASS

LOOP_DEFAULTS = LoopConfig()


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


@click.command()
@click.option("--name", default=LOOP_DEFAULTS.name, show_default=True,
              help="Loop name: models NAME-m0 (teacher), NAME-m1, ...; selections NAME-sel1, ...")
@click.option("--iterations", default=LOOP_DEFAULTS.iterations, show_default=True, type=click.IntRange(1))
@click.option("--models", "models", required=True, metavar="A,B,C,...",
              help="timm architectures: the teacher, then the student of each iteration (the last repeats).")
@click.option("--images", "images_ref", default=None, metavar="REF", help="Images version (default: latest).")
# train (students; the teacher too, except its budget, unless --teacher-* say otherwise)
@click.option("--epochs", default=None, type=range_type("epochs"),
              help="Epochs of each student: passes over the labeled split, as a teacher's (the selection's size "
                   f"does not change it) [default: {STUDENT_STEPS:,} steps].")
@click.option("--steps", default=None, type=range_type("steps"), help="Steps of each student (instead of epochs).")
@click.option("--teacher-epochs", default=None, type=range_type("epochs"),
              help=f"Teacher epochs (passes over the labeled split) [default: {TEACHER_STEPS:,} steps].")
@click.option("--teacher-steps", default=None, type=range_type("steps"), help="Teacher steps (instead of epochs).")
@click.option("--teacher-noise/--no-teacher-noise", default=None,
              help="Noise for the teacher [default: as the students, like `nsd train`].")
@click.option("--baseline", is_flag=True,
              help="Also train NAME-baseline: the final student's architecture on the labeled split alone, "
                   "same options, for the loop's total steps (teacher + students): compute-matched.")
@click.option("--student-init", type=click.Choice(["teacher", "scratch"]), default=LOOP_DEFAULTS.student_init,
              show_default=True, help="Start each student from its teacher's weights (same architecture only) "
                                      "or from scratch.")
@click.option("--device", default=LOOP_DEFAULTS.device, show_default=True, help="auto, cpu, cuda, cuda:N (all steps).")
@click.option("--noise/--no-noise", default=None, help="All student noise on/off (default: on).")
@training_options
# label
@click.option("--temperature", default=LabelParams.temperature, show_default=True, type=temperature_type(),
              help="Soft labels softmax(logits / T).")
@click.option("--calibrate", is_flag=True, default=LabelParams.calibrate,
              help="Fit each teacher's T on the val split (nsd label --calibrate).")
@click.option("--top-k", default=None, type=click.IntRange(max=MAX_TOP_K), help="Keep the K largest probabilities per image.")
@click.option("--label-batch-size", default=LabelParams.batch_size, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--shard-size", default=LabelParams.shard_size, show_default=True, type=click.IntRange(1, MAX_SHARD))
# balance
@click.option("--threshold", default=BalanceParams.threshold, show_default=True, type=finite(), help="Keep confidence > threshold.")
@click.option("--per-class", default=None, type=click.IntRange(max=MAX_PER_CLASS), metavar="K", help="Images per class [default: median].")
@click.option("--no-duplicate", is_flag=True, help="Do not duplicate rare classes up to K.")
@click.option("--hard", is_flag=True, help="One-hot targets instead of soft ones.")
@click.option("--sharpen", default=None, type=sharpen_type(), metavar="T", help="Soft targets p^(1/T), renormalised.")
@click.option("--no-leakage-gate", is_flag=True, help="Keep pool images near a test image (nsd balance).")
@click.option("--sql", "sql_file", default=None, metavar="FILE", help="Your own selection query.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the steps and the final table as JSON.")
@click.pass_context
def loop(ctx, name, iterations, models, images_ref, epochs, steps, teacher_epochs, teacher_steps, teacher_noise,
         baseline, student_init, batch_size, unlabeled_ratio, lr, weight_decay, seed, image_size, device, workers, noise, randaug_n,
         randaug_m, drop_rate, drop_path_rate, random_erasing, hflip, ema, pretrained, temperature, calibrate, top_k, label_batch_size, shard_size,
         threshold, per_class, no_duplicate, hard, sharpen, no_leakage_gate, sql_file, no_progress, as_json):
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
    train = dict(epochs=epochs, steps=steps, batch_size=batch_size, unlabeled_ratio=unlabeled_ratio, lr=lr,
                 weight_decay=weight_decay, seed=seed, image_size=image_size, workers=workers,
                 noise=noise, randaug_n=randaug_n, randaug_m=randaug_m, drop_rate=drop_rate,
                 drop_path_rate=drop_path_rate, random_erasing=random_erasing, hflip=hflip, ema=ema,
                 pretrained=pretrained, progress=progress)
    cfg = LoopConfig(
        name=name, models=tuple(m.strip() for m in models.split(",")), iterations=iterations, images=images_ref,
        device=device, teacher_epochs=teacher_epochs, teacher_steps=teacher_steps, teacher_noise=teacher_noise,
        train=train, baseline=baseline, student_init=student_init,
        label=dict(temperature=temperature, top_k=top_k, batch_size=label_batch_size,
                   shard_size=shard_size, progress=progress, calibrate=calibrate),
        balance=dict(threshold=threshold, per_class=per_class, duplicate=not no_duplicate, hard=hard,
                     sharpen=sharpen, sql_file=sql_file,
                     **({"leakage_distance": None} if no_leakage_gate else {})))
    out = run_loop(get_store(ctx), cfg, log=lambda msg: click.echo(msg, err=True))
    for r in out["table"]:
        if r["flag"]:  # never presented as progress
            click.echo(f"warning: {r['model']} ({_pct(r['test_acc'])}) is {r['flag']}", err=True)
    if as_json:
        return echo_json(out)
    print_report(out["table"], title=f"loop {name} (images@{out['images_version']})")


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
