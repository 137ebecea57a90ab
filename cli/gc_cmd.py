"""`nsd gc`: a thin wrapper over nsd.engine.gc.gc."""

import click

from nsd.cli.main import echo_json, get_store


@click.command()
@click.option("--older-than", default="1h", show_default=True, metavar="AGE",
              help="Only what is older than AGE (e.g. 30m, 2h, 7d, or seconds).")
@click.option("--delete", is_flag=True, help="Remove them (default: only list what would go).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def gc(ctx, older_than, delete, as_json):
    """Remove leftovers of killed or failed commands: data files no snapshot uses, staging
    directories of dead processes, half-written .tmp files. Dry run unless --delete.

    Never touches a file any snapshot references, nor anything newer than the start of a
    running nsd command on any host, nor the parts of a running label run (running commands
    announce themselves at the data path). Snapshots are kept: every version stays readable.

    Examples:

    \b
      nsd gc                  # what would be removed
      nsd gc --delete --older-than 1d
    """
    from nsd.engine.gc import gc as run_gc, parse_duration

    out = run_gc(get_store(ctx), older_than=parse_duration(older_than), delete=delete)
    if as_json:
        return echo_json(out)
    verb = "would remove" if out["dry_run"] else "removed"
    for kind in ("orphaned_files", "old_files", "staging", "tmp_files"):
        click.echo(f"{verb} {len(out[kind])} {kind.replace('_', ' ')} ({_size(out['bytes'][kind])})")
        for path in out[kind][:20]:
            click.echo(f"  {path}")
        if len(out[kind]) > 20:
            click.echo(f"  ... {len(out[kind]) - 20} more (see --json)")
    for item in out["skipped"][:20]:
        click.echo(f"kept {item['path']}: {item['why']}")
    if len(out["skipped"]) > 20:
        click.echo(f"kept {len(out['skipped']) - 20} more files of running commands (see --json)")
    if out["dry_run"] and any(out[k] for k in out["bytes"]):
        click.echo("dry run: nothing removed; run again with --delete")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
