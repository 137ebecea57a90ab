"""`nsd versions`, `nsd tag`, `nsd show`, `nsd head`, `nsd diff`, `nsd sql`: thin wrappers over
nsd.engine.inspect (and Store.tag) that parse options and print rich tables or --json."""

from __future__ import annotations

import click

from nsd.cli.main import console, echo_json, get_store, visible
from nsd.cli.types import MAX_ROWS

WIDE_COLUMNS = 6  # `nsd head` prints tables with more columns one row at a time

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _table(title: str | None, columns: list[str], rows: list[list], **kw):
    from rich.table import Table

    table = Table(title=title, title_justify="left", **kw)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return visible(str(value))


def _bold(head: str, rest: str = ""):
    """HEAD in bold then REST, both literal (the console prints no markup)."""
    from rich.text import Text

    return Text.assemble((head, "bold"), rest)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _class(class_id, name) -> str:
    if class_id is None:
        return "(none)"
    return f"{class_id} {name}" if name is not None else str(class_id)


# --------------------------------------------------------------------------- versions, tag


@click.command()
@click.option("--last", type=click.IntRange(max=10**9), default=None, help="Only the newest N snapshots.")
@JSON_OPTION
@click.pass_context
def versions(ctx, last, as_json):
    """List snapshots: time, author, message, what changed, tags.

    Example:

    \b
        nsd versions --last 5
    """
    from nsd.engine.inspect import versions as list_versions

    rows = list_versions(get_store(ctx), last=last)
    if as_json:
        return echo_json(rows)
    console().print(_table(None, ["snapshot", "time", "author", "message", "changes", "tags"], [
        [r["snapshot_id"], (r["time"] or "")[:19], r["author"], r["message"], r["summary"],
         ", ".join(r["tags"])] for r in rows]))


@click.command()
@click.argument("name")
@click.option("--version", "ref", default=None, help="Snapshot number or tag to name (default: latest).")
@click.option("--force", is_flag=True, help="Move NAME if it already names another snapshot.")
@JSON_OPTION
@click.pass_context
def tag(ctx, name, ref, force, as_json):
    """Name a snapshot NAME. An existing tag moves only with --force.

    Examples:

    \b
        nsd tag before-relabel
        nsd tag raw --version 2
        nsd tag release --version 12 --force
    """
    store = get_store(ctx)
    commit = store.tag(name, ref, force=force)
    target = commit.result  # the snapshot tagged, as the commit recorded it
    if as_json:
        return echo_json({"tag": name, "snapshot_id": target, "commit_snapshot_id": commit.snapshot_id})
    click.echo(f"tagged snapshot {target} as {name} (snapshot {commit.snapshot_id})")


# --------------------------------------------------------------------------- show


@click.command()
@click.argument("table_ref", metavar="TABLE[@REF]")
@JSON_OPTION
@click.pass_context
def show(ctx, table_ref, as_json):
    """Summarise TABLE at REF (snapshot number or tag; default latest).

    images: per split and class. pseudo_labels: per label run and predicted class, with
    accuracy against hidden gold labels when the store has them. selections: per selection
    and class. models, runs, tags, classes: the rows.

    Examples:

    \b
        nsd show pseudo_labels
        nsd show images@raw --json
    """
    from nsd.engine.inspect import show as summarise
    from nsd.engine.store import parse_table_ref

    table, ref = parse_table_ref(table_ref)
    out = summarise(get_store(ctx), table, ref)
    if as_json:
        return echo_json(out)
    con = console()
    con.print(_bold(table, f" at snapshot {out['snapshot_id']}: {out['rows']} rows"))
    _SHOW_PRINTERS[table](con, out)


def _print_images(con, out):
    # One row per class, one column per split: a 10-class data set fits on one screen.
    splits = [r["split"] for r in out["by_split"]]
    counts, names = {}, {}
    for r in out["by_class"]:
        counts[(r["class_id"], r["split"])] = r["rows"]
        names[r["class_id"]] = r["name"]
    classes = sorted(names, key=lambda c: (c is None, c if c is not None else 0))
    rows = [[_class(c, names[c]) if c is not None else "(no label)", *[counts.get((c, sp), 0) for sp in splits]]
            for c in classes]
    rows.append(["total", *[r["rows"] for r in out["by_split"]]])
    con.print(_table("per class and split", ["class", *splits], rows))


def _print_pseudo_labels(con, out):
    con.print(_table("label runs", ["label_run", "teacher", "rows", "mean conf", "accuracy"], [
        [r["label_run"], r["teacher"], r["rows"], r["mean_confidence"],
         _pct(r["accuracy"]["accuracy"]) if r["accuracy"] else "-"] for r in out["label_runs"]]))
    for run in out["label_runs"]:
        acc = run["accuracy"]
        if acc is None:
            con.print(_table(f"{run['label_run']}: per predicted class", ["class", "rows", "mean conf"],
                             [[_class(r["class_id"], r["name"]), r["rows"], r["mean_confidence"]]
                              for r in run["by_class"]]))
            continue
        conf = {r["class_id"]: r["mean_confidence"] for r in run["by_class"]}
        con.print(_table(
            f"{run['label_run']}: accuracy {_pct(acc['accuracy'])} on {acc['rows']} images with gold labels",
            ["class", "predicted", "mean conf", "precision", "gold", "recall"],
            [[_class(r["class_id"], r["name"]), r["predicted"], conf.get(r["class_id"]), _pct(r["precision"]),
              r["gold"], _pct(r["recall"])] for r in acc["per_class"]]))
        con.print(_table(f"{run['label_run']}: per confidence bucket", ["confidence", "rows", "accuracy", "mean conf"],
                         [[b["bucket"], b["rows"], _pct(b["accuracy"]), b["mean_confidence"]]
                          for b in acc["buckets"]]))


def _print_selections(con, out):
    con.print(_table("selections", ["selection", "rows", "copies", "label_run"],
                     [[s["selection"], s["rows"], s["copies"], s["label_run"]] for s in out["selections"]]))
    for s in out["selections"]:
        con.print(_table(f"{s['selection']}: per class", ["class", "rows", "copies"],
                         [[_class(r["class_id"], r["name"]), r["rows"], r["copies"]] for r in s["by_class"]]))


def _print_items(con, out):
    items = out["items"]
    if items:
        cols = list(items[0])
        con.print(_table(None, cols, [[i[c] for c in cols] for i in items]))


def _print_rejects(con, out):
    con.print(_table("per reason", ["reason", "rows"], [[r["reason"], r["rows"]] for r in out["by_reason"]]))


_SHOW_PRINTERS = {
    "images": _print_images, "pseudo_labels": _print_pseudo_labels, "selections": _print_selections,
    "models": _print_items, "runs": _print_items, "tags": _print_items, "classes": _print_items,
    "rejects": _print_rejects,
}


# --------------------------------------------------------------------------- head


@click.command()
@click.argument("table_ref", metavar="TABLE[@REF]")
@click.option("-n", "n", type=click.IntRange(max=100_000), default=10, show_default=True, help="How many rows (at most 100,000).")
@JSON_OPTION
@click.pass_context
def head(ctx, table_ref, n, as_json):
    """First N rows of TABLE at REF (BLOBs shown as <N bytes>, long lists cut).

    Example:

    \b
        nsd head selections@fmnist-it1-balance -n 5
    """
    from nsd.engine.inspect import head as first_rows
    from nsd.engine.store import parse_table_ref

    table, ref = parse_table_ref(table_ref)
    out = first_rows(get_store(ctx), table, ref, n)
    if as_json:
        return echo_json(out)
    title = f"{table} at snapshot {out['snapshot_id']}"
    columns, rows = out["columns"], out["rows"]
    con = console()
    if len(columns) <= WIDE_COLUMNS:
        return con.print(_table(title, columns, [[r[c] for c in columns] for r in rows]))
    # Wide tables (images, pseudo_labels) do not fit a terminal as one grid: print each row
    # as a block of column/value lines, like psql's expanded mode.
    con.print(_bold(title, f": {len(rows)} rows"))
    for i, r in enumerate(rows, 1):
        con.print(_table(f"row {i}", ["column", "value"], [[c, r[c]] for c in columns], show_header=False))


# --------------------------------------------------------------------------- diff


@click.command()
@click.argument("table")
@click.argument("ref_a", required=False)
@click.argument("ref_b", required=False)
@click.option("--runs", nargs=2, default=None, metavar="RUN_A RUN_B",
              help="pseudo_labels: compare these two label runs image by image.")
@JSON_OPTION
@click.pass_context
def diff(ctx, table, ref_a, ref_b, runs, as_json):
    """Rows added and removed in TABLE from REF_A to REF_B (REF_B default: latest).

    Per-class deltas for images, pseudo_labels and selections; for pseudo_labels also how
    many images changed class between the latest label runs at each version (or --runs).

    Examples:

    \b
        nsd diff images raw
        nsd diff pseudo_labels fmnist-it1-label fmnist-it2-label
        nsd diff pseudo_labels --runs label-3f2a label-9c1d
    """
    from nsd.engine.inspect import diff as compare
    from nsd.engine.store import check_table

    check_table(table)
    out = compare(get_store(ctx), table, ref_a, ref_b, runs=tuple(runs) if runs else None)
    if as_json:
        return echo_json(out)
    con = console()
    con.print(_bold(table, f" snapshot {out['from']} -> {out['to']}: "
                       f"{out['rows_from']} -> {out['rows_to']} rows, +{out['added']} added, -{out['removed']} removed"))
    if out.get("by_class"):
        group = [k for k in out["by_class"][0] if k not in ("class_id", "name", "added", "removed", "delta")][0]
        con.print(_table("per class", [group, "class", "added", "removed", "delta"], [
            [r[group], _class(r["class_id"], r["name"]), r["added"], r["removed"], f"{r['delta']:+d}"]
            for r in out["by_class"]]))
    for key in ("added_keys", "removed_keys"):
        if out.get(key):
            con.print(f"{key.replace('_', ' ')}: {', '.join(map(str, out[key]))}")
    change = out.get("label_change")
    if change:
        con.print(f"label runs {change['run_a']} -> {change['run_b']}: {change['changed_class']} of "
                  f"{change['common_images']} images changed class")
        if "with_truth" in change:
            con.print(f"accuracy {_pct(change['accuracy_a'])} -> {_pct(change['accuracy_b'])} on "
                      f"{change['with_truth']} images with gold labels ({change['fixed']} fixed, "
                      f"{change['broken']} broken)")
        if change["top_moves"]:
            con.print(_table("top class changes", ["from", "to", "images"], [
                [_class(m["from_class"], m["from_name"]), _class(m["to_class"], m["to_name"]), m["images"]]
                for m in change["top_moves"]]))


# --------------------------------------------------------------------------- sql


@click.command()
@click.argument("query")
@click.option("--at", "at", default=None, help="Snapshot number or tag to query (default: latest).")
@click.option("--limit", type=click.IntRange(max=MAX_ROWS), default=1000, show_default=True,
              help=f"Print at most this many rows (0: all, up to {MAX_ROWS:,}).")
@JSON_OPTION
@click.pass_context
def sql(ctx, query, at, limit, as_json):
    """Run one read-only SELECT against the store's tables (at a snapshot with --at).

    Writes, COPY, ATTACH, INSTALL, LOAD, PRAGMA, SET and the like are refused.

    Examples:

    \b
        nsd sql "SELECT predicted, count(*) AS n FROM pseudo_labels GROUP BY 1" --at fmnist-it1-label
        nsd sql "SELECT split, count(*) AS n FROM images GROUP BY split" --json
    """
    import itertools
    import json

    from nsd.engine.inspect import jsonable, sql_rows

    if limit < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--limit")
    limit = limit or MAX_ROWS
    rows = sql_rows(get_store(ctx), query, at=at, limit=limit + 1)
    if as_json:  # streamed: one row at a time, whatever the result's size
        first = next(rows, None)  # errors surface before any output
        click.echo("[")
        for n, row in enumerate(itertools.chain([first] if first is not None else [], rows)):
            if n == limit:
                click.echo(f"note: showing the first {limit} rows; use --limit to see more", err=True)
                break
            click.echo(("," if n else "") + json.dumps(jsonable(row), sort_keys=True, allow_nan=False))
        rows.close()  # ends the query (and releases the store) now, not at garbage collection
        click.echo("]")
        return
    rows = [jsonable(r) for r in rows]
    if len(rows) > limit:
        rows = rows[:limit]
        click.echo(f"note: showing the first {limit} rows; use --limit to see more", err=True)
    columns = list(rows[0]) if rows else []
    console().print(_table(None, columns, [[r[c] for c in columns] for r in rows]))
    click.echo(f"{len(rows)} rows")
