"""`nsd export`: a thin wrapper over nsd.engine.export."""

from __future__ import annotations

import click

from nsd.cli.main import echo_json, get_store
from nsd.engine.export import FORMATS
from nsd.engine.params import MAX_SHARD


@click.command()
@click.argument("source")
@click.argument("out", metavar="DIR")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="imagefolder", show_default=True,
              help="imagefolder (torchvision/timm), parquet (rows as they are), hf (datasets' load_from_disk), "
                   "webdataset (tar shards).")
@click.option("--at", default=None, metavar="REF", help="Snapshot number or tag (default: latest).")
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(1, MAX_SHARD),
              help="Rows per Parquet file / samples per tar shard.")
@click.option("--force", is_flag=True, help="Replace DIR if it holds an earlier nsd export.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def export(ctx, source, out, fmt, at, shard_size, force, progress, as_json):
    """Write SOURCE (a selection NAME[@REF], or the split labeled, test or unlabeled) to the
    new directory DIR in a format other trainers load, with manifest.json (store, snapshot,
    lineage, counts). A selection's duplicated images are written once per copy (imagefolder,
    hf, webdataset) or with their copy count (parquet).

    Examples:

    \b
        nsd export fmnist-sel1 ./sel1 --format imagefolder
        nsd export fmnist-sel2@v14 ./sel2-hf --format hf
        nsd export test ./test-shards --format webdataset --shard-size 5000
    """
    import sys

    from nsd.engine.export import export as run_export

    manifest = run_export(get_store(ctx), source, out, fmt, at=at, force=force, shard_size=shard_size,
                          progress=sys.stderr.isatty() if progress is None else progress)
    if as_json:
        return echo_json(manifest)
    click.echo(f"exported {manifest['rows_with_copies']:,} rows ({manifest['images']:,} images) of {source} "
               f"at snapshot {manifest['snapshot']} to {manifest['path']} ({fmt})")
