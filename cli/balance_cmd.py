"""`nsd balance`: thin wrapper over nsd.engine.balance."""

import click

from nsd.cli.main import echo_json, get_store
from nsd.cli.types import finite, sharpen_type
from nsd.engine.balance import BalanceParams
from nsd.engine.dups import MAX_DISTANCE
from nsd.engine.params import MAX_PER_CLASS

# Images per class a selection may ask for: the paper used 130K for ImageNet.


@click.command()
@click.option("--labels", "labels", default=None, metavar="REF",
              help="Version (snapshot or tag) to read pseudo_labels and images at [default: latest].")
@click.option("--run", "run", default=None, metavar="RUN_ID",
              help="Label run to balance [default: the most recent one at that version].")
@click.option("--name", default=None, help="Name of the new selection (required unless --dry-run/--show-sql).")
@click.option("--threshold", default=BalanceParams.threshold, show_default=True, type=finite(),
              help="Keep pseudo labels with confidence > threshold.")
@click.option("--per-class", "per_class", default=None, type=click.IntRange(max=MAX_PER_CLASS), metavar="K",
              help="Images per class, at most 1,000,000 [default: median of the per-class candidate counts].")
@click.option("--no-duplicate", "no_duplicate", is_flag=True,
              help="Do not duplicate classes with fewer than K candidates.")
@click.option("--hard", is_flag=True, help="One-hot targets instead of soft probabilities.")
@click.option("--sharpen", default=None, type=sharpen_type(), metavar="T", help="Soft targets p^(1/T), renormalised.")
@click.option("--leakage-distance", "leakage_distance", default=BalanceParams.leakage_distance, show_default=True,
              type=click.IntRange(0, MAX_DISTANCE), metavar="BITS",
              help="Leave out unlabeled images whose perceptual hash is within BITS of a test image's.")
@click.option("--no-leakage-gate", "no_leakage_gate", is_flag=True,
              help="Keep near-copies of test images (only exact copies are left out).")
@click.option("--dry-run", "dry_run", is_flag=True, help="Print per-class counts; write nothing.")
@click.option("--show-sql", "show_sql", is_flag=True, help="Print the balancing SQL and exit.")
@click.option("--sql", "sql_file", default=None, metavar="FILE",
              help="Run your own selection query (same inputs and $parameters as --show-sql).")
@click.option("--allow-empty", "allow_empty", is_flag=True, help="Write the selection even if it is empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def balance(ctx, labels, run, name, threshold, per_class, no_duplicate, hard, sharpen, leakage_distance,
            no_leakage_gate, dry_run, show_sql, sql_file, allow_empty, as_json):
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
    params = BalanceParams(labels=labels, run=run, threshold=threshold, per_class=per_class,
                           duplicate=not no_duplicate, hard=hard, sharpen=sharpen, sql_file=sql_file,
                           leakage_distance=None if no_leakage_gate else leakage_distance)
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
