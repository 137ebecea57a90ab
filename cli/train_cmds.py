"""`nsd train` and `nsd eval`: parse options, call nsd.engine.train, print the result.

Option defaults and noise ranges are the engine's (TrainConfig, engine/transforms). torch and
timm are imported inside the commands (nsd.engine.train imports them lazily), never at import time.
"""

from __future__ import annotations

from dataclasses import fields

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.types import MAX_BATCH, finite
from nsd.engine.train import TRAIN_RANGES, TrainConfig
from nsd.engine.transforms import NOISE_DEFAULTS, NOISE_RANGES

TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def range_type(key: str) -> click.IntRange:
    """The option type of a whole-number training setting, from its range in TRAIN_RANGES."""
    return click.IntRange(*TRAIN_RANGES[key])


def _noise_type(key: str):
    """The option type of a noise setting, from its range in NOISE_RANGES."""
    low, high, closed = NOISE_RANGES[key]
    if isinstance(NOISE_DEFAULTS[key], int):
        return click.IntRange(low, high if closed else high - 1)
    return finite(low, high, max_open=not closed)


def training_options(f):
    """The training options `nsd train` and `nsd loop` share (the loop passes them on)."""
    options = [
        click.option("--batch-size", default=TRAIN_DEFAULTS["batch_size"], show_default=True,
                     type=range_type("batch_size"), help="Labeled batch B."),
        click.option("--unlabeled-ratio", default=TRAIN_DEFAULTS["unlabeled_ratio"], show_default=True,
                     type=range_type("unlabeled_ratio"), help="Pseudo-labeled batch is R x B."),
        click.option("--lr", default=TRAIN_DEFAULTS["lr"], show_default=True, type=finite(0, 10, min_open=True)),
        click.option("--weight-decay", default=TRAIN_DEFAULTS["weight_decay"], show_default=True, type=finite(0, 10)),
        click.option("--seed", default=TRAIN_DEFAULTS["seed"], show_default=True, type=range_type("seed")),
        click.option("--image-size", default=None, type=range_type("image_size"), help="Default: the images' own size."),
        click.option("--workers", default=TRAIN_DEFAULTS["workers"], show_default=True,
                     type=range_type("workers"), help="DataLoader workers."),
        click.option("--randaug-n", default=None, type=_noise_type("randaug_n"),
                     help=f"RandAugment ops per image (0: off) [default: {NOISE_DEFAULTS['randaug_n']}]."),
        click.option("--randaug-m", default=None, type=_noise_type("randaug_m"),
                     help=f"RandAugment magnitude (0-30) [default: {NOISE_DEFAULTS['randaug_m']:g}]."),
        click.option("--drop-rate", default=None, type=_noise_type("drop_rate"),
                     help=f"Dropout before the classifier [default: {NOISE_DEFAULTS['drop_rate']}]."),
        click.option("--drop-path-rate", default=None, type=_noise_type("drop_path_rate"),
                     help=f"Stochastic depth [default: {NOISE_DEFAULTS['drop_path_rate']}]."),
        click.option("--random-erasing", default=None, type=_noise_type("random_erasing"),
                     help=f"Random erasing probability [default: {NOISE_DEFAULTS['random_erasing']}]."),
        click.option("--hflip", default=TRAIN_DEFAULTS["hflip"], show_default=True, type=finite(0, 1),
                     help="Horizontal flip probability of the training crop (0 for digits or text)."),
        click.option("--ema", default=None, type=finite(0, 1, min_open=True, max_open=True),
                     help="Keep EMA weights with this decay and register them."),
        click.option("--pretrained", is_flag=True,
                     help="Start from timm's pretrained weights for the architecture (downloaded from its hub)."),
    ]
    for option in reversed(options):  # decorators apply bottom-up; keep this order in --help
        f = option(f)
    return f


@click.command()
@click.option("--model", "arch", required=True,
              help="A timm architecture name, e.g. resnet18, test_resnet (local weights: --pretrained-file).")
@click.option("--name", required=True, help="Name of the model in the store.")
@click.option("--selection", default=None, help="NAME[@REF]: train a student on labeled + this selection.")
@click.option("--images", "images_ref", default=None, help="Store version of the images (default: latest).")
@click.option("--epochs", default=TRAIN_DEFAULTS["epochs"], show_default=True, type=range_type("epochs"),
              help="Passes over the labeled split, for a teacher and a student alike "
                   "(a student's selection cycles alongside).")
@click.option("--steps", default=None, type=range_type("steps"),
              help="Train for exactly this many steps instead (fixed budgets across runs).")
@click.option("--device", default=TRAIN_DEFAULTS["device"], show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--noise/--no-noise", default=None,
              help="All noise (RandAugment, dropout, stochastic depth, random erasing) on/off "
                   "[default: on, for teachers and students].")
@training_options
@click.option("--pretrained-file", default=None, metavar="FILE",
              help="Start from these weights (safetensors or a weights-only state dict; a new head when "
                   "the classes differ).")
@click.option("--init-from", default=None, metavar="MODEL", help="Start from the weights of a model in the store.")
@click.option("--eval-split", default=TRAIN_DEFAULTS["eval_split"], show_default=True,
              help="Evaluate on this split at the end ('' to skip).")
@click.option("--save-every", default=TRAIN_DEFAULTS["save_every"], show_default=True, type=range_type("save_every"),
              help="Also save the resumable state every N steps (default: at an epoch's end once 200 steps passed).")
@click.option("--resume", is_flag=True, help="Continue the unfinished run NAME from its saved state.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the registered model as JSON.")
@click.pass_context
def train(ctx, arch, name, selection, images_ref, epochs, steps, batch_size, unlabeled_ratio, lr, weight_decay, seed,
          image_size, device, workers, noise, randaug_n, randaug_m, drop_rate, drop_path_rate, random_erasing, hflip,
          ema, pretrained, pretrained_file, init_from, eval_split, save_every, resume, no_progress, as_json):
    """Train a teacher (labeled split) or, with --selection, a noised student.

    Both train with noise by default (the teacher should be the best supervised model; it
    labels without noise). Runs under torchrun for DDP: `torchrun --nproc-per-node N nsd train ...`.

    Example:

    \b
        nsd train --model resnet18 --name teacher0 --pretrained-file resnet18.safetensors --epochs 20
    """
    from nsd.engine.train import TrainConfig, train as run_train

    store = get_store(ctx)
    cfg = TrainConfig(name=name, arch=arch, selection=selection, images=images_ref, epochs=epochs, steps=steps,
                      batch_size=batch_size, unlabeled_ratio=unlabeled_ratio, lr=lr, weight_decay=weight_decay,
                      seed=seed, image_size=image_size, device=device, workers=workers, noise=noise,
                      randaug_n=randaug_n, randaug_m=randaug_m, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                      random_erasing=random_erasing, hflip=hflip, ema=ema, pretrained=pretrained,
                      pretrained_file=pretrained_file, init_from=init_from, eval_split=eval_split or None, save_every=save_every, progress=not no_progress)
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
