"""`nsd ingest SOURCE`: a thin wrapper over nsd.engine.ingest.ingest."""

import sys

import click

from nsd.cli.main import echo_json, get_store
from nsd.engine.params import MAX_CLASSES_CAP, MAX_WORKERS, SPLITS


@click.command()
@click.argument("source")
@click.option("--split", type=click.Choice(SPLITS), default=None,
              help="Split for the images [default: labeled if the source has labels, else unlabeled].")
@click.option("--labeled-per-class", type=click.IntRange(min=0), default=None, metavar="N",
              help="Keep N labeled images per class (chosen by --seed); the rest become unlabeled, "
                   "their label kept hidden in gold_label.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --labeled-per-class.")
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None,
              help="Processes encoding/checking images, 1-64 [default: one per core, at most 8].")
@click.option("--max-bytes", type=click.IntRange(1, 1 << 40), default=None, metavar="N",
              help="Reject files over N bytes [default: $NSD_MAX_IMAGE_BYTES or 64 MiB].")
@click.option("--max-pixels", type=click.IntRange(1, 1 << 40), default=None, metavar="N",
              help="Reject images over N pixels (width x height, read from the header before decoding) "
                   "[default: $NSD_MAX_IMAGE_PIXELS or 50,000,000].")
@click.option("--max-classes", type=click.IntRange(1, MAX_CLASSES_CAP), default=None, metavar="N",
              help="Reject labels that would make more than N classes [default: $NSD_MAX_CLASSES or 10,000].")
@click.option("--image-root", default=None, metavar="DIR",
              help="Parquet rows {bytes: null, path: P}: read P only inside DIR "
                   "[default: the Parquet file's own directory].")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def ingest(ctx, source, split, labeled_per_class, seed, workers, max_bytes, max_pixels, max_classes, image_root,
           progress, as_json):
    """Add the images of SOURCE to the store, as one snapshot.

    SOURCE is an image folder (class subfolders = labeled, flat = unlabeled), a Parquet
    file or folder (`image`/`bytes` column, optional `label`), an IDX images file (MNIST
    format, labels file beside it), a dataset saved with save_to_disk, hf:NAME[:SPLIT]
    (Hugging Face hub, streamed), any fsspec URL of these, or `fashion-mnist`
    (train -> labeled, t10k -> test).

    Images already in the store (same sha256) are skipped. Only regular files are read;
    undecodable files, files over the byte or pixel cap, non-integral labels and labels over
    the class cap are recorded in the `rejects` table with the reason.

    Examples:

    \b
      nsd ingest fashion-mnist --labeled-per-class 100 --seed 0
      nsd ingest ./photos --split unlabeled
      nsd ingest s3://bucket/train.parquet
    """
    from nsd.engine.ingest import ingest as run_ingest
    from nsd.engine.sources import Limits

    store = get_store(ctx)
    if progress is None:
        progress = sys.stderr.isatty()
    result = run_ingest(store, source, split=split, labeled_per_class=labeled_per_class, seed=seed,
                        progress=progress, workers=workers,
                        limits=Limits.from_env(max_bytes, max_pixels, max_classes, image_root))
    if as_json:
        echo_json(result.to_dict())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, emoji=False)
    console.print(f"ingested {escape(source)} as snapshot {result.snapshot_id} (run {result.run_id}, "
                  f"{result.read:,} items read)")
    table = Table()
    table.add_column("")
    table.add_column("images", justify="right")
    for split_name, n in result.added.items():
        table.add_row(f"added {split_name}", f"{n:,}")
    table.add_row("already in store", f"{result.already_present:,}")
    table.add_row("repeated in source", f"{result.repeated_in_source:,}")
    table.add_row("rejected", f"{result.rejected:,}", style="red" if result.rejected else None)
    table.add_row("classes added", f"{result.classes_added:,}")
    console.print(table)
    for src, reason in result.reject_examples:
        console.print(f"[red]rejected[/red] {escape(src)}: {escape(reason)}", highlight=False)
    if result.rejected > len(result.reject_examples):
        console.print(f"... see all with: nsd sql \"SELECT * FROM rejects WHERE ingest_run = '{result.run_id}'\"",
                      highlight=False)
