"""`nsd label`: thin wrapper over nsd.engine.label (torch is imported only when it runs)."""

import os

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.types import MAX_BATCH, MAX_SHARD, MAX_TOP_K, MAX_WORKERS, finite, temperature_type
from nsd.engine.label import LabelParams


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
@click.option("--temperature", default=LabelParams.temperature, show_default=True, type=temperature_type(),
              help="Soft labels are softmax(logits / T); T > 0.")
@click.option("--calibrate", is_flag=True, default=LabelParams.calibrate,
              help="Fit T on the val split (labeled images no model trained on) and label with it.")
@click.option("--top-k", default=None, type=click.IntRange(max=MAX_TOP_K), help="Keep only the K largest probabilities per image.")
@click.option("--batch-size", default=LabelParams.batch_size, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--num-workers", default=LabelParams.num_workers, show_default=True, type=click.IntRange(0, MAX_WORKERS),
              help="0: read, decode and infer in one thread. Otherwise a reader thread feeds the "
                   "model; on CPU each of torch's threads decodes and labels whole batches, on GPU "
                   "N threads decode.")
@click.option("--shard-size", default=LabelParams.shard_size, show_default=True, type=click.IntRange(1, MAX_SHARD),
              help="Images per resumable unit (one Parquet part each).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def label(ctx, teacher, from_path, weights, images_ref, temperature, calibrate, top_k, batch_size, device,
          num_workers, shard_size, as_json):
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
    params = LabelParams(temperature=temperature, top_k=top_k, batch_size=batch_size, device=device,
                         num_workers=num_workers, shard_size=shard_size, progress=True, calibrate=calibrate)
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
