"""`nsd init`."""

import click

from nsd.cli.main import echo_json, get_store


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def init(ctx, as_json):
    """Create the store (catalog, data directory, tables). Safe to run twice.

    Example:

    \b
        nsd --store ./fmnist init
    """
    store = get_store(ctx, must_exist=False)
    snapshot = store.init()
    if as_json:
        echo_json({"store": store.name, "created": snapshot is not None, "snapshot_id": snapshot})
    elif snapshot is None:
        click.echo(f"store {store.name} already exists")
    else:
        click.echo(f"created store {store.name} (snapshot {snapshot})")
