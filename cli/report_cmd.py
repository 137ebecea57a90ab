"""`nsd report`: a thin wrapper over nsd.engine.report."""

from __future__ import annotations

import click

from nsd.cli.main import get_store


@click.command()
@click.option("--loop", "loop_name", default=None, metavar="NAME", help="A loop (models NAME-m0, NAME-m1, ...).")
@click.option("--model", default=None, metavar="MODEL", help="A model and its lineage.")
@click.option("--labels", default=None, metavar="REF", help="A label run id, or a version/tag (its newest label run).")
@click.option("-o", "--output", "out", default="report.html", show_default=True, metavar="FILE",
              help="Where to write the HTML file (not inside the store, not a link).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists (a regular file only).")
@click.option("--thumbs", default=8, show_default=True, type=int, help="Thumbnails per class in each grid (0-32).")
@click.option("--bins", default=20, show_default=True, type=int, help="Confidence histogram bins (2-100).")
@click.option("--open", "open_it", is_flag=True, help="Open the report in the default browser.")
@click.pass_context
def report(ctx, loop_name, model, labels, out, force, thumbs, bins, open_it):
    """Write one self-contained HTML report (no network, no server): the loop at a glance,
    lineage, each label run (confidence, calibration, flips), each selection (per class
    kept/duplicated/dropped, K), thumbnail grids, and the store's versions and tables.

    Without --loop/--model/--labels it reports the newest loop (else model, else label run).

    Examples:

    \b
        nsd report --loop fmnist -o fmnist.html
        nsd report --model fmnist-m1 -o m1.html --thumbs 8
    """
    from nsd.engine.report import report as write_report

    path = write_report(get_store(ctx), out, loop=loop_name, model=model, labels=labels, thumbs=thumbs, bins=bins,
                        force=force)
    click.echo(str(path))
    if open_it:
        import webbrowser

        webbrowser.open(path.as_uri())
