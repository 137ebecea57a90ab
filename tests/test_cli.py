"""The command line itself: every command's --help ends in examples, and they parse."""

import shlex

import click
import pytest

from helpers import nsd
from nsd.cli.main import cli

COMMANDS = cli.list_commands(click.Context(cli))


def examples(help_text: str) -> list[list[str]]:
    """The block of `nsd ...` lines under the Example(s): heading, each as argv (comments and
    redirects cut). Every line of the block must be a whole command: none wrapped by click."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:"))
    block = [line.strip() for line in lines[start + 1:]]
    while block and not block[0]:
        block.pop(0)
    block = block[:block.index("")] if "" in block else block
    assert block and all(line.startswith("nsd ") for line in block), block
    out = []
    for line in block:
        argv = shlex.split(line, comments=True)[1:]
        out.append(argv[:argv.index(">")] if ">" in argv else argv)
    return out


def test_every_command_is_listed():
    assert len(COMMANDS) == 19 and {"init", "ingest", "label", "balance", "train", "loop", "report", "export", "hash",
                                    "dups"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_examples_that_parse(name):
    res = nsd(None, name, "--help")
    assert res.exit_code == 0, res.output
    assert "Example:" in res.output or "Examples:" in res.output, res.output
    found = examples(res.output)
    assert found and all(name in argv for argv in found), (name, found)
    for argv in found:
        # The group's options, then the command's: click checks every option name and value.
        at = argv.index(name)
        group = cli.make_context("nsd", argv[:at + 1])
        command = cli.get_command(group, name)
        command.make_context(name, argv[at + 1:], parent=group)
