"""`nsd balance`: thin wrapper over nsd.engine.balance."""

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.options import Options
from nsd.engine.balance import BalanceParams

BALANCE = Options(BalanceParams)


@click.command()
@click.option("--name", default=None, help="Name of the new selection (required unless --dry-run/--show-sql).")
@BALANCE
@click.option("--dry-run", "dry_run", is_flag=True, help="Print per-class counts; write nothing.")
@click.option("--show-sql", "show_sql", is_flag=True, help="Print the balancing SQL and exit.")
@click.option("--allow-empty", "allow_empty", is_flag=True, help="Write the selection even if it is empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def balance(ctx, name, dry_run, show_sql, allow_empty, as_json, **options):
    """Filter and balance one label run's pseudo labels into a selection (one snapshot).

    Keeps confidence > --threshold, K per class (the K most confident; classes with fewer
    are duplicated up to K), one row per image, never an image of the labeled or test split
    nor a near-copy of a test image (perceptual hash within --leakage-distance bits).

    Examples:

    \b
        nsd balance --dry-run --threshold 0.5
        nsd balance --name sel1 --per-class 6000
        nsd balance --show-sql > mine.sql
        nsd balance --name sel2 --sql mine.sql
    """
    from nsd.engine import balance as engine
    from nsd.engine.errors import UsageError

    if show_sql:
        click.echo(engine.balance_sql(), nl=False)
        return
    params = BalanceParams(**BALANCE.take(options))
    store = get_store(ctx)
    if dry_run:
        result = engine.plan(store, params)
        if as_json:
            echo_json(result)
        else:
            _print_plan(result)
        return
    if not name:
        raise UsageError("--name is required (or use --dry-run)")
    result = engine.balance(store, name, params, allow_empty=allow_empty)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"selection {result['selection']}: {result['rows']} images, {result['copies']} copies, "
                   f"{result['classes']} classes, K={result['per_class']} from {result['label_run']} "
                   f"(version {result['labels_version']}) -> snapshot {result['snapshot_id']}"
                   + (f"; {result['near_test_excluded']} near-copies of test images left out"
                      if result["near_test_excluded"] else ""))


def _print_plan(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = ("candidates", "after_threshold", "kept", "copies_added", "dropped", "total")
    gate = ("no leakage gate" if result["leakage_distance"] is None else
            f"{result['near_test_excluded']} near-copies of test images left out (distance <= {result['leakage_distance']})")
    table = Table(title=f"dry run: {result['label_run']} at version {result['labels_version']}, "
                        f"threshold {result['threshold']}, K={result['per_class']}; {gate}")
    table.add_column("class", justify="right")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for row in result["classes"]:
        table.add_row(str(row["class"]), *(str(row[k]) for k in keys))
    table.add_row("total", *(str(result["totals"][k]) for k in keys), style="bold")
    Console(markup=False, emoji=False).print(table)
