"""The `runs` table's queries: every command's run (label, balance, train, ...) is one row.

Other modules ask here, so "the latest label run" or "the balance run of a selection" means the
same thing in `balance`, `diff`, `report` and `lineage`. Every function takes an open
connection (the store attached as ``lake``), so it can run inside a write as well as a read.
"""

from __future__ import annotations

import json

from nsd.engine.errors import UsageError
from nsd.engine.store import name_literal


def _at(snap: int | None) -> str:
    return "" if snap is None else f" AT (VERSION => {int(snap)})"


def _equals(column: str, value: str) -> tuple[str, list]:
    """COLUMN = VALUE as a constant (DuckLake then reads only the files that may hold it), or as
    a bound parameter when VALUE is not a name nsd makes (every file is read)."""
    try:
        return f"{column} = {name_literal(value, column)}", []
    except UsageError:
        return f"{column} = ?", [value]


def has_label_rows(con, run: str, snap: int | None = None) -> bool:
    """Whether `pseudo_labels` at SNAP (default: the connection's) holds rows of label run RUN."""
    where, params = _equals("label_run", run)
    return con.execute(f"SELECT 1 FROM lake.pseudo_labels{_at(snap)} WHERE {where} LIMIT 1", params
                       ).fetchone() is not None


def latest_label_run(con, snap: int | None = None) -> str | None:
    """The label run finished last among those with rows at SNAP (default: the connection's);
    labels written without a runs row count by their newest rows. None when there are none."""
    for (run_id,) in con.execute(
        f"SELECT run_id FROM lake.runs{_at(snap)} WHERE kind = 'label' ORDER BY finished_at DESC NULLS LAST, run_id DESC"
    ).fetchall():
        if has_label_rows(con, run_id, snap):
            return run_id
    row = con.execute(f"SELECT label_run FROM lake.pseudo_labels{_at(snap)} "
                      "ORDER BY snapshot_id DESC, label_run DESC LIMIT 1").fetchone()
    return row[0] if row else None


def previous_label_run(con, run: str) -> str | None:
    """The label run finished last before RUN."""
    row = con.execute(
        "SELECT r.run_id FROM lake.runs r, (SELECT finished_at FROM lake.runs WHERE run_id = ?) me "
        "WHERE r.kind = 'label' AND r.finished_at < me.finished_at ORDER BY r.finished_at DESC LIMIT 1",
        [run]).fetchone()
    return row[0] if row else None


def balance_run(con, selection: str) -> dict | None:
    """The balance run that wrote SELECTION: ``{"run_id", "params", "reads"}`` (JSON decoded)."""
    row = con.execute("SELECT run_id, params, reads FROM lake.runs WHERE kind = 'balance' AND name = ? LIMIT 1",
                      [selection]).fetchone()
    if row is None:
        return None
    return {"run_id": row[0], "params": _object(row[1]), "reads": _object(row[2])}


def run_params(con, run_id: str) -> dict:
    """The parameters RUN_ID was given (its lineage), JSON decoded; {} for an unknown run."""
    row = con.execute("SELECT params FROM lake.runs WHERE run_id = ? LIMIT 1", [run_id]).fetchone()
    return _object(row[0]) if row else {}


def _object(text) -> dict:
    """A JSON object column as a dict; {} for anything else (a shared catalog is input)."""
    try:
        out = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def selections_of(con, label_run: str) -> list[str]:
    """The selections balanced from LABEL_RUN, oldest first."""
    return [r[0] for r in con.execute(
        "SELECT name FROM lake.runs WHERE kind = 'balance' AND json_extract_string(params, '$.label_run') = ? "
        "ORDER BY finished_at, name", [label_run]).fetchall()]


def label_run_of(con, selection: str) -> str | None:
    """The label run whose pseudo labels SELECTION holds."""
    where, params = _equals("selection", selection)
    return con.execute(f"SELECT any_value(label_run) FROM lake.selections WHERE {where}", params).fetchone()[0]
