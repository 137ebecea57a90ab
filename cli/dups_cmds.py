"""`nsd hash` and `nsd dups`: thin wrappers over nsd.engine.dups."""

import click

from nsd.cli.main import echo_json, get_store, visible
from nsd.engine.dups import DEFAULT_DISTANCE, MAX_DISTANCE


@click.command("hash")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Hashing processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def hash_cmd(ctx, workers, as_json):
    """Compute the perceptual hash of every stored image that has none (one snapshot).

    `nsd ingest` hashes new images itself; run this once on a store made by an older nsd so
    that `nsd dups` and balance's leakage gate see every image.

    Example:

    \b
        nsd hash
    """
    from nsd.engine.dups import hash_images

    out = hash_images(get_store(ctx), workers=workers, progress=not as_json)
    if as_json:
        return echo_json(out)
    if out["snapshot_id"] is None:
        click.echo("every image already has a hash: nothing to do")
    else:
        click.echo(f"hashed {out['hashed']:,} images ({out['failed']:,} could not be decoded) "
                   f"-> snapshot {out['snapshot_id']}")


@click.command()
@click.option("--distance", default=DEFAULT_DISTANCE, show_default=True, type=click.IntRange(0, MAX_DISTANCE),
              help="Largest Hamming distance (bits of 64) between the hashes of two near-duplicates.")
@click.option("--splits", default=None, metavar="LIST",
              help="Only images of these splits, comma-separated (labeled, unlabeled, test) [default: all].")
@click.option("--across", is_flag=True, help="Only groups with images of more than one split.")
@click.option("--version", "version", default=None, metavar="REF", help="Snapshot or tag [default: latest].")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0, 100_000),
              help="Groups to list (the counts cover all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def dups(ctx, distance, splits, across, version, limit, as_json):
    """Near-duplicate groups by perceptual hash, within and across splits.

    Two images are near-duplicates when their 64-bit hashes differ in at most --distance
    bits; a group is a connected set of such pairs. The pairs come from one banded SQL join
    (schemas/near_pairs.sql) that finds exactly what comparing all pairs would.

    Examples:

    \b
        nsd dups
        nsd dups --splits test,unlabeled --across --json
        nsd dups --distance 0 --limit 100
    """
    from nsd.engine.dups import dups as find

    chosen = None if splits is None else [s.strip() for s in splits.split(",") if s.strip()]
    out = find(get_store(ctx), distance, splits=chosen, version=version, across=across, limit=limit)
    if as_json:
        return echo_json(out)
    _print(out)


def _print(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, emoji=False, highlight=False)
    console.print(f"version {out['version']}, distance <= {out['distance']}: {out['pairs']:,} pairs, "
                  f"{out['groups']:,} groups, {out['images_in_groups']:,} images in groups "
                  f"({out['images_hashed']:,} images hashed, {out['images_unhashed']:,} not: run `nsd hash`)"
                  if out["images_unhashed"] else
                  f"version {out['version']}, distance <= {out['distance']}: {out['pairs']:,} pairs, "
                  f"{out['groups']:,} groups, {out['images_in_groups']:,} images in groups")
    if not out["shown"]:
        return
    table = Table()
    for col, justify in (("group", "right"), ("image_id", "left"), ("split", "left"), ("label", "right"),
                         ("distance", "right")):
        table.add_column(col, justify=justify)
    table.add_column("source (its end)", no_wrap=True)
    for group in out["shown"]:
        for k, image in enumerate(group["images"]):
            table.add_row(str(group["group"]) if k == 0 else "", image["image_id"][:12], image["split"],
                          "" if image["label"] is None else str(image["label"]), str(image["distance"]),
                          _tail(visible(str(image["source"] or ""))))
        table.add_section()
    console.print(table)


def _tail(text: str, width: int = 24) -> str:
    """The end of a source path: the file name tells the images of a group apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]
