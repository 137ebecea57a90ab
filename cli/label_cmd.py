"""`nsd label`: thin wrapper over nsd.engine.label (torch is imported only when it runs)."""

import os

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.options import Options
from nsd.engine.label import LabelParams

LABEL = Options(LabelParams, exclude=("progress",))  # rank 0 always shows progress


@click.command()
@click.option("--teacher", required=True, metavar="MODEL",
              help="A model in the store, or with --weights a timm architecture, or with --from the name of "
                   "the external teacher.")
@click.option("--from", "from_path", default=None, metavar="FILE",
              help="Import soft labels computed elsewhere: a Parquet file (or a directory of them) with columns "
                   "image_id and probs.")
@click.option("--weights", default=None, metavar="FILE",
              help="Weights trained elsewhere (safetensors or a weights-only state dict).")
@click.option("--images", "images_ref", default=None, metavar="REF",
              help="Snapshot number or tag of the images to label (default: latest).")
@LABEL
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def label(ctx, teacher, from_path, weights, images_ref, as_json, **options):
    """Label the unlabeled pool with a teacher, with no noise (eval mode, eval transform).

    One completed run is one snapshot of pseudo_labels. Interrupted runs resume: run the same
    command again. Distributed: torchrun --nproc-per-node N nsd label ...

    Examples:

    \b
        nsd label --teacher teacher0
        nsd label --teacher teacher0 --calibrate
        nsd label --teacher resnet18 --weights teacher.safetensors --top-k 5
        nsd label --from vit-labels.parquet --teacher vit-h14-cluster
    """
    if from_path is not None:
        return _import(ctx, from_path, teacher, weights, as_json)
    from nsd.engine.label import label as run_label

    store = get_store(ctx)
    params = LabelParams(**LABEL.take(options))
    out = run_label(store, teacher, weights, images_ref, params)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports for the whole run
    if as_json:
        echo_json(out)
    elif out.get("already_labeled"):
        click.echo(f"already labeled: run {out['run_id']} at snapshot {out['snapshot_id']} "
                   f"({out['rows']} rows)")
    else:
        cal = out.get("calibration")
        click.echo(f"labeled {out['rows']} images with {out['teacher']} (T={out['temperature']:g}"
                   + (f" fitted on {cal['images']} val images: ECE {cal['ece_before']:.1%} -> {cal['ece_after']:.1%}"
                      if cal else "")
                   + (f", top-{out['top_k']}" if out["top_k"] else "")
                   + f"): run {out['run_id']}, snapshot {out['snapshot_id']}, "
                   f"{out['images_per_s']} img/s")


def _import(ctx, from_path, teacher, weights, as_json):
    """`nsd label --from`: an external teacher's soft labels as a label run."""
    from nsd.engine.external import import_labels

    if weights is not None:
        raise click.UsageError("--from imports soft labels: it takes no --weights")
    out = import_labels(get_store(ctx), from_path, teacher)
    if as_json:
        return echo_json(out)
    click.echo(f"imported {out['rows']} soft labels of external teacher {teacher}: run {out['run_id']}, "
               f"snapshot {out['snapshot_id']}" + (f"; {out['rejected']} rows refused" if out["rejected"] else ""))
    for r in out["rejects"]:
        click.echo(f"  refused {r['image_id']}: {r['reason']}", err=True)
