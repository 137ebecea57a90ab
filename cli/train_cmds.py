"""`nsd train` and `nsd eval`: parse options, call nsd.engine.train, print the result.

The options are TrainConfig's declarations (engine/train.py); `nsd loop` takes them too. torch
and timm are imported inside the commands (nsd.engine.train imports them lazily).
"""

from __future__ import annotations

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.options import Options
from nsd.engine.params import MAX_BATCH
from nsd.engine.train import TrainConfig

TRAIN = Options(TrainConfig)


@click.command()
@TRAIN
@click.option("--resume", is_flag=True, help="Continue the unfinished run NAME from its saved state.")
@click.option("--json", "as_json", is_flag=True, help="Print the registered model as JSON.")
@click.pass_context
def train(ctx, resume, as_json, **options):
    """Train a teacher (labeled split) or, with --selection, a noised student.

    Both train with noise by default (the teacher should be the best supervised model; it
    labels without noise). Runs under torchrun for DDP: `torchrun --nproc-per-node N nsd train ...`.

    Example:

    \b
        nsd train --model resnet18 --name teacher0 --pretrained-file resnet18.safetensors --epochs 20
    """
    from nsd.engine.train import train as run_train

    store = get_store(ctx)
    cfg = TrainConfig(**TRAIN.take(options))
    rec = run_train(store, cfg, resume=resume)
    if rec is None:  # not rank 0 of a DDP run
        return
    if as_json:
        echo_json(rec)
        return
    test = (rec["metrics"].get("eval") or {}).get(cfg.eval_split or "", {})
    last = rec["metrics"]["epochs"][-1] if rec["metrics"]["epochs"] else {}
    click.echo(f"trained {rec['model']} ({rec['arch']}, {rec['num_params']:,} params) snapshot {rec['snapshot_id']}: "
               f"loss {last.get('loss', float('nan')):.4f}"
               + (f", {test['split']} top-1 {test['top1']:.4f}" if test else ""))


@click.command()
@click.argument("model")
@click.option("--split", default="test", show_default=True, help="test, labeled or unlabeled (gold labels needed).")
@click.option("--images", "images_ref", default=None, help="Store version of the images (default: latest).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--device", default="auto", show_default=True)
@click.option("--no-record", is_flag=True, help="Do not store the result with the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def evaluate(ctx, model, split, images_ref, batch_size, device, no_record, as_json):
    """Top-1 and per-class accuracy of MODEL on a split; stored as a new row of the model.

    Example:

    \b
        nsd eval teacher0 --split test --json
    """
    from nsd.engine.train import evaluate as run_eval

    res = run_eval(get_store(ctx), model, split, images_ref, batch_size=batch_size, device=device,
                   record=not no_record)
    if as_json:
        echo_json(res)
        return
    click.echo(f"{model} on {split} (images v{res['images_version']}, {res['n']} images): top-1 {res['top1']:.4f}")
    for cls, acc in res["per_class"].items():
        click.echo(f"  {cls:<20} {'-' if acc is None else f'{acc:.4f}'}")
