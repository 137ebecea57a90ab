"""The `nsd` command. Thin: each command parses options and calls into nsd.engine.

Heavy libraries (torch, timm, datasets) are imported inside the commands that need them, so
`nsd --help` and the inspection commands start fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import importlib.util

import click

from nsd.engine.errors import NsdError, first_line
from nsd.engine.store import DEFAULT_STORE, mask_secrets

# command name -> "module:function" inside nsd.cli, loaded on first use.
COMMANDS = {
    "init": "nsd.cli.store_cmds:init",
    "ingest": "nsd.cli.ingest_cmd:ingest",
    "versions": "nsd.cli.inspect_cmds:versions",
    "tag": "nsd.cli.inspect_cmds:tag",
    "show": "nsd.cli.inspect_cmds:show",
    "head": "nsd.cli.inspect_cmds:head",
    "diff": "nsd.cli.inspect_cmds:diff",
    "sql": "nsd.cli.inspect_cmds:sql",
    "label": "nsd.cli.label_cmd:label",
    "balance": "nsd.cli.balance_cmd:balance",
    "train": "nsd.cli.train_cmds:train",
    "eval": "nsd.cli.train_cmds:evaluate",
    "loop": "nsd.cli.loop_cmds:loop",
    "lineage": "nsd.cli.loop_cmds:lineage",
    "gc": "nsd.cli.gc_cmd:gc",
    "report": "nsd.cli.report_cmd:report",
    "export": "nsd.cli.export_cmd:export",
    "hash": "nsd.cli.dups_cmds:hash_cmd",
    "dups": "nsd.cli.dups_cmds:dups",
}

SHORT_HELP = {
    "init": "Create a store.",
    "ingest": "Add images to the store.",
    "versions": "List snapshots and what changed.",
    "tag": "Name a snapshot.",
    "show": "Summarise a table at a version.",
    "head": "First rows of a table at a version.",
    "diff": "Rows and classes changed between two versions.",
    "sql": "Run a read-only SQL query.",
    "label": "Label the unlabeled pool with a teacher (no noise).",
    "balance": "Filter and balance pseudo labels into a selection (SQL).",
    "train": "Train a teacher or a noised student.",
    "eval": "Evaluate a model on a split.",
    "loop": "Run Noisy Student iterations end to end.",
    "lineage": "Trace a model back to its labeled data.",
    "gc": "Remove leftovers of killed commands (dry run by default).",
    "report": "Write a self-contained HTML report of a loop and the store.",
    "export": "Write a selection or split for other trainers (ImageFolder, Parquet, HF, WebDataset).",
    "hash": "Compute perceptual hashes of images that have none.",
    "dups": "Near-duplicate images by perceptual hash, within and across splits.",
}


class LazyGroup(click.Group):
    """Loads command modules on use, and turns NsdError into one line on stderr."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    def _available(self, name):
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NsdError as exc:
            click.echo(f"error: {visible(mask_secrets(str(exc)))}", err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # a bad option of a command: one line too, not click's usage block
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:  # an nsd bug or an environment failure: still one line
            if os.environ.get("NSD_DEBUG"):
                raise
            click.echo(f"error: {type(exc).__name__}: {visible(mask_secrets(first_line(exc, empty='')))}"
                       " (set NSD_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", envvar="NSD_STORE", default=DEFAULT_STORE, show_default=True,
              help="Store location: a directory, or postgres:<conninfo> ($NSD_STORE).")
@click.option("--data-path", envvar="NSD_DATA_PATH", default=None,
              help="Data files location for a postgres store: a directory or s3:// / gs:// URL.")
@click.version_option(package_name="nsd")
@click.pass_context
def cli(ctx, store, data_path):
    """nsd: a data engine for Noisy Student self-training.

    A teacher labels unlabeled images, SQL balances its soft labels into a versioned
    selection, a noised student trains on them streaming from the store, and becomes the
    next teacher. Every table version is traceable.
    """
    ctx.ensure_object(dict)
    ctx.obj["store_uri"] = store
    ctx.obj["data_path"] = data_path


# Characters that drive a terminal instead of showing: C0/C1 controls (ESC starts colour,
# title and hyperlink sequences) and the bidirectional overrides that reorder what is shown.
_HIDDEN = {c for c in range(0x20)} | {0x7f} | set(range(0x80, 0xa0)) | set(range(0x202a, 0x202f)) | \
    set(range(0x2066, 0x206a))
_VISIBLE = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _HIDDEN - {0x0a}}


def visible(text: str) -> str:
    """TEXT (data: a class name, a value, an error naming either) with every character that
    would drive the terminal written as an escape (ESC as \\x1b); newlines stay."""
    return text.translate(_VISIBLE)


def get_store(ctx: click.Context, must_exist: bool = True):
    """The Store named by the group's --store / --data-path."""
    from nsd.engine.store import Store

    obj = ctx.find_root().obj or {}
    store = Store(obj.get("store_uri"), obj.get("data_path"))
    return store.require() if must_exist else store


def echo_json(obj) -> None:
    """OBJ as JSON any parser reads (engine.inspect.jsonable: NaN and infinities become null)."""
    import json

    from nsd.engine.inspect import jsonable

    click.echo(json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False))


def console(min_width: int = 160):
    """A rich console on the stdout in force (CliRunner swaps it) for readable tables.

    In a log file or a pipe rich assumes 80 columns and squeezes wide tables; use MIN_WIDTH.
    Markup and emoji codes are off: every string printed (class names, paths, SQL results) is
    data and shows as written; style with rich Text where wanted.
    """
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=False, markup=False, emoji=False)
    if not out.is_terminal:
        out.width = max(out.width, min_width)
    return out


if __name__ == "__main__":  # pragma: no cover
    cli()
