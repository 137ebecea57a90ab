"""Looking at a store: versions, table summaries, first rows, diffs and read-only SQL.

Every function here only reads. Each returns plain dicts and lists (JSON-ready), so the CLI's
``--json`` output is ``json.dumps`` of the return value and a Python user gets the same data.
A REF is a snapshot number, a tag, or None for the latest snapshot (see :meth:`Store.resolve`).

All the work is done by DuckDB aggregations at a pinned snapshot; nothing loads a whole table
into Python.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import re
import threading
from typing import Any, Iterator

import duckdb

from nsd.engine.env import env_number
from nsd.engine.errors import UsageError, first_line
from nsd.engine.runs import latest_label_run
from nsd.engine.store import Store, check_table
from nsd.schemas import TABLES

# Confidence buckets for pseudo-label accuracy: [lo, hi), the last one closed at 1.0.
CONFIDENCE_BUCKETS = [(0.0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0)]
# Cells of `head` output: lists longer than this are cut, strings longer than LONG_TEXT too.
LIST_ITEMS = 5
LONG_TEXT = 80
# How many ids/keys a diff lists for small tables (models, runs, tags).
DIFF_KEYS = 20

# Statement types `sql` lets through. EXPLAIN is not among them: EXPLAIN ANALYZE executes.
_READ_TYPES = {duckdb.StatementType.SELECT}
# Statements DuckDB parses as SELECT but that change the session (e.g. PRAGMA version is a
# SELECT, PRAGMA threads=1 a SET): refused by their first keyword too.
_REFUSED_KEYWORDS = {"PRAGMA", "SET", "RESET", "ATTACH", "DETACH", "INSTALL", "LOAD", "COPY",
                     "EXPORT", "IMPORT", "CALL", "USE", "CHECKPOINT", "VACUUM"}
# Table functions a query may call: they only read the store's own catalog or make rows.
SQL_TABLE_FUNCTIONS = {
    "range", "generate_series", "unnest",
    "ducklake_snapshots", "ducklake_table_info", "ducklake_table_changes", "ducklake_table_insertions",
    "ducklake_table_deletions", "ducklake_list_files", "ducklake_current_snapshot",
}
# Scalar functions with side effects on the session.
_REFUSED_FUNCTIONS = {"write_log", "nextval", "currval", "setseed"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `nsd sql` interrupts a query running longer than this ($NSD_SQL_TIMEOUT seconds).
SQL_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- versions


def versions(store: Store, last: int | None = None) -> list[dict]:
    """Every snapshot, oldest first: id, time, author, message, command, what changed, tags.

    ``summary`` is a short text such as ``"+1000 images, +1 runs"`` built from the lineage
    row counts the writing command recorded. ``last`` keeps only the newest N.
    """
    store.require()
    snaps = store.snapshots()
    tags_by_snap: dict[int, list[str]] = {}
    for tag, snap in store.tags().items():
        tags_by_snap.setdefault(snap, []).append(tag)
    out = []
    for s in snaps:
        lineage = s["lineage"] or {}
        rows = lineage.get("rows") or {}
        out.append({
            "snapshot_id": s["snapshot_id"],
            "time": s["time"],
            "author": s["author"],
            "message": s["message"],
            "command": lineage.get("command"),
            "run_id": lineage.get("run_id"),
            "rows": rows,
            "reads": lineage.get("reads") or {},
            "tags": sorted(tags_by_snap.get(s["snapshot_id"], [])),
            "summary": _change_summary(rows, s["changes"]),
        })
    if last is not None:
        if last < 1:
            raise UsageError(f"--last must be at least 1, got {last}")
        out = out[-last:]
    return out


def _change_summary(rows: dict, changes: str | None) -> str:
    if rows:
        return ", ".join(f"{n:+d} {table}" for table, n in rows.items())
    text = changes or ""
    created = re.search(r"tables_created=\[([^\]]*)\]", text)
    if created:
        return f"created {len(created.group(1).split(','))} tables"
    if "schemas_created" in text:
        return "created the catalog"
    return ""


# --------------------------------------------------------------------------- show


def show(store: Store, table: str, ref: str | int | None = None) -> dict:
    """Summary of TABLE at REF.

    Always ``{"table", "snapshot_id", "rows", ...}``; the rest depends on the table:

    * images: ``by_split`` and ``by_class`` (split, class id, class name, rows);
    * pseudo_labels: ``label_runs``, each with rows, mean confidence, ``by_class`` (per
      predicted class) and, where the images hold truth (``gold_label``, else ``label``),
      ``accuracy``: overall, per class and per confidence bucket;
    * selections: ``selections``, each with rows, sum of copies and ``by_class``;
    * models, runs, tags, classes: the rows themselves (``items``); rejects: ``by_reason``.
    """
    check_table(table)
    snap = store.resolve(ref)
    with store.reader(snap) as con:
        out: dict[str, Any] = {"table": table, "snapshot_id": snap,
                               "rows": _scalar(con, f"SELECT count(*) FROM {table}")}
        names = _class_names(con)
        out.update(_SHOW[table](con, names))
    return out


def images_summary(con, names):
    by_split = _dicts(con, "SELECT split, count(*) AS rows FROM images GROUP BY split ORDER BY split")
    by_class = _named(names, _dicts(con, "SELECT split, label AS class_id, count(*) AS rows FROM images "
                                         "GROUP BY split, label ORDER BY split, label NULLS LAST"))
    return {"by_split": by_split, "by_class": by_class}


def _show_pseudo_labels(con, names):
    runs = _dicts(con, """
        SELECT label_run, any_value(teacher) AS teacher, count(*) AS rows,
               avg(confidence) AS mean_confidence, max(rowid) AS last_row
        FROM pseudo_labels GROUP BY label_run ORDER BY last_row""")
    for run in runs:
        run.pop("last_row")
        run["by_class"] = _named(names, _dicts(con, """
            SELECT predicted AS class_id, count(*) AS rows, avg(confidence) AS mean_confidence
            FROM pseudo_labels WHERE label_run = ? GROUP BY predicted ORDER BY predicted NULLS LAST""",
                                               [run["label_run"]]))
        run["accuracy"] = label_accuracy(con, run["label_run"], names)
    return {"label_runs": runs}


def label_accuracy(con, label_run: str, names: dict) -> dict | None:
    """Pseudo-label accuracy of one label run against the images' truth, or None if unknown.

    Truth is ``gold_label`` (hidden label of an image moved to the unlabeled split), else
    ``label``. Only images with a truth count.
    """
    judged = """
        SELECT p.predicted, p.confidence, coalesce(i.gold_label, i.label) AS truth
        FROM pseudo_labels p JOIN images i USING (image_id)
        WHERE p.label_run = ? AND coalesce(i.gold_label, i.label) IS NOT NULL"""
    total, correct = con.execute(
        f"SELECT count(*), count(*) FILTER (predicted = truth) FROM ({judged})", [label_run]).fetchone()
    if not total:
        return None
    per_class = {c: {"class_id": c, "name": names.get(c), "predicted": 0, "correct": 0, "precision": None,
                     "gold": 0, "recall": None}
                 for c in names}
    for c, n, ok in con.execute(
            f"SELECT predicted, count(*), count(*) FILTER (predicted = truth) FROM ({judged}) GROUP BY 1",
            [label_run]).fetchall():
        e = per_class.setdefault(c, {"class_id": c, "name": names.get(c), "predicted": 0, "correct": 0,
                                     "precision": None, "gold": 0, "recall": None})
        e.update(predicted=n, correct=ok, precision=ok / n)
    for c, n, ok in con.execute(
            f"SELECT truth, count(*), count(*) FILTER (predicted = truth) FROM ({judged}) GROUP BY 1",
            [label_run]).fetchall():
        e = per_class.setdefault(c, {"class_id": c, "name": names.get(c), "predicted": 0, "correct": 0,
                                     "precision": None, "gold": 0, "recall": None})
        e.update(gold=n, recall=ok / n)
    bucket_case = " ".join(f"WHEN confidence < {hi} THEN {i}" for i, (_, hi) in enumerate(CONFIDENCE_BUCKETS[:-1]))
    got = {b: (n, ok, conf) for b, n, ok, conf in con.execute(
        f"""SELECT CASE {bucket_case} ELSE {len(CONFIDENCE_BUCKETS) - 1} END AS b, count(*),
                   count(*) FILTER (predicted = truth), avg(confidence)
            FROM ({judged}) GROUP BY b""", [label_run]).fetchall()}
    buckets = []
    for i, (lo, hi) in enumerate(CONFIDENCE_BUCKETS):
        n, ok, conf = got.get(i, (0, 0, None))
        buckets.append({"bucket": f"[{lo}, {hi}{']' if i == len(CONFIDENCE_BUCKETS) - 1 else ')'}",
                        "low": lo, "high": hi, "rows": n, "correct": ok,
                        "accuracy": ok / n if n else None, "mean_confidence": conf})
    return {"rows": total, "correct": correct, "accuracy": correct / total,
            "per_class": [per_class[c] for c in sorted(per_class, key=lambda c: (c is None, c))],
            "buckets": buckets}


def selections_summary(con, names):
    sels = _dicts(con, """
        SELECT selection, count(*) AS rows, sum(copies) AS copies, any_value(label_run) AS label_run
        FROM selections GROUP BY selection ORDER BY selection""")
    for sel in sels:
        sel["by_class"] = _named(names, _dicts(con, """
            SELECT predicted AS class_id, count(*) AS rows, sum(copies) AS copies
            FROM selections WHERE selection = ? GROUP BY predicted ORDER BY predicted NULLS LAST""",
                                               [sel["selection"]]))
    return {"selections": sels}


def _show_models(con, names):
    items = _dicts(con, """
        SELECT model, arch, num_classes, num_params, selection, selection_version, teacher,
               metrics, checkpoint, created_at::VARCHAR AS created_at
        FROM models ORDER BY created_at, model""")
    for m in items:
        m["metrics"] = _parse_json(m["metrics"])
    return {"items": items}


def _show_runs(con, names):
    items = _dicts(con, """
        SELECT run_id, kind, name, row_counts, started_at::VARCHAR AS started_at,
               finished_at::VARCHAR AS finished_at
        FROM runs ORDER BY started_at, run_id""")
    for r in items:
        r["row_counts"] = _parse_json(r["row_counts"])
    return {"items": items}


def _show_tags(con, names):
    return {"items": _dicts(con, "SELECT tag, snapshot_id, created_at::VARCHAR AS created_at "
                                 "FROM tags ORDER BY created_at, tag")}


def _show_classes(con, names):
    return {"items": [{"class_id": c, "name": n} for c, n in sorted(names.items())]}


def _show_rejects(con, names):
    return {"by_reason": _dicts(con, "SELECT reason, count(*) AS rows FROM rejects "
                                     "GROUP BY reason ORDER BY rows DESC, reason")}


_SHOW = {
    "images": images_summary, "pseudo_labels": _show_pseudo_labels, "selections": selections_summary,
    "models": _show_models, "runs": _show_runs, "tags": _show_tags, "classes": _show_classes,
    "rejects": _show_rejects,
}


# --------------------------------------------------------------------------- head


def head(store: Store, table: str, ref: str | int | None = None, n: int = 10) -> dict:
    """The first N rows of TABLE at REF (insertion order), ready to print.

    BLOBs become ``"<N bytes>"``, lists longer than 5 items are cut (``"... +K more"``) and long
    strings shortened. Returns ``{"table", "snapshot_id", "columns", "rows"}`` (rows are dicts).
    """
    check_table(table)
    if n < 0:
        raise UsageError(f"-n must be 0 or more, got {n}")
    snap = store.resolve(ref)
    with store.reader(snap) as con:
        cur = con.execute(f"SELECT * FROM {table} ORDER BY rowid LIMIT ?", [int(n)])
        columns = [d[0] for d in cur.description]
        rows = [{c: _cell(v) for c, v in zip(columns, row)} for row in cur.fetchall()]
    return {"table": table, "snapshot_id": snap, "columns": columns, "rows": rows}


def _cell(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        cells = [_cell(v) for v in value[:LIST_ITEMS]]
        if len(value) > LIST_ITEMS:
            cells.append(f"... +{len(value) - LIST_ITEMS} more")
        return cells
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str) and len(value) > LONG_TEXT:
        return value[:LONG_TEXT - 3] + "..."
    return jsonable(value)


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it: BLOBs as "<N bytes>", times as ISO text, decimals as float,
    NaN and infinities (which JSON has no words for) as None, anything else unknown as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- diff


def diff(store: Store, table: str, ref_a: str | int | None = None, ref_b: str | int | None = None,
         runs: tuple[str, str] | None = None) -> dict:
    """Rows added and removed in TABLE going from REF_A to REF_B (either order works).

    DuckLake keeps a row's ``rowid`` for its whole life, so "added" are rowids at B not at A
    and "removed" the reverse (net change: a row added and dropped in between does not show).
    Returns ``{"table", "from", "to", "added", "removed", ...}`` plus per-class deltas
    (``by_class``: images by split and label, pseudo_labels and selections by predicted
    class) or the added/removed keys of small tables (``added_keys``/``removed_keys``).

    For pseudo_labels, ``label_change`` compares two label runs image by image: ``runs``
    names them, else the label run added most recently at each version is used.
    """
    check_table(table)
    if runs is not None and table != "pseudo_labels":
        raise UsageError("--runs only applies to pseudo_labels")
    if ref_a is None and ref_b is None and runs is None:
        raise UsageError("diff needs two versions (REF_A REF_B) or, for pseudo_labels, --runs RUN_A RUN_B")
    a, b = store.resolve(ref_a), store.resolve(ref_b)
    # One connection at the newer snapshot; the older side is read with AT (VERSION => a).
    with store.reader(max(a, b)) as con:
        out: dict[str, Any] = {"table": table, "from": a, "to": b}
        added = f"(SELECT * FROM {table} AT (VERSION => {b}) WHERE rowid NOT IN (SELECT rowid FROM {table} AT (VERSION => {a})))"
        removed = f"(SELECT * FROM {table} AT (VERSION => {a}) WHERE rowid NOT IN (SELECT rowid FROM {table} AT (VERSION => {b})))"
        out["rows_from"] = _scalar(con, f"SELECT count(*) FROM {table} AT (VERSION => {a})")
        out["rows_to"] = _scalar(con, f"SELECT count(*) FROM {table} AT (VERSION => {b})")
        out["added"] = _scalar(con, f"SELECT count(*) FROM {added}")
        out["removed"] = _scalar(con, f"SELECT count(*) FROM {removed}")
        names = _class_names(con)
        group = _DIFF_GROUPS.get(table)
        if group:
            out["by_class"] = _class_deltas(con, added, removed, group, names)
        key = _DIFF_KEYS.get(table)
        if key:
            out["added_keys"] = [r[0] for r in con.execute(
                f"SELECT DISTINCT {key} FROM {added} ORDER BY 1 LIMIT {DIFF_KEYS}").fetchall()]
            out["removed_keys"] = [r[0] for r in con.execute(
                f"SELECT DISTINCT {key} FROM {removed} ORDER BY 1 LIMIT {DIFF_KEYS}").fetchall()]
        if table == "pseudo_labels":
            if runs is None:
                run_a, run_b = latest_label_run(con, a), latest_label_run(con, b)
            else:
                run_a, run_b = runs
                known = {r[0] for r in con.execute("SELECT DISTINCT label_run FROM pseudo_labels").fetchall()}
                for r in runs:
                    if r not in known:
                        raise UsageError(f"unknown label run {r!r} at snapshot {max(a, b)}")
            out["label_change"] = (label_change(con, run_a, run_b, max(a, b), names)
                                   if run_a and run_b else None)
    return out


# table -> SQL expressions grouped for per-class deltas (label/predicted is the class id).
_DIFF_GROUPS = {
    "images": ("split", "label"),
    "pseudo_labels": ("label_run", "predicted"),
    "selections": ("selection", "predicted"),
}
_DIFF_KEYS = {"models": "model", "runs": "run_id", "tags": "tag", "classes": "class_id",
              "rejects": "source"}


def _class_deltas(con, added: str, removed: str, group: tuple[str, str], names: dict) -> list[dict]:
    g, c = group
    rows = con.execute(f"""
        SELECT coalesce(x.g, y.g), coalesce(x.c, y.c), coalesce(x.n, 0), coalesce(y.n, 0)
        FROM (SELECT {g} AS g, {c} AS c, count(*) AS n FROM {added} GROUP BY ALL) x
        FULL JOIN (SELECT {g} AS g, {c} AS c, count(*) AS n FROM {removed} GROUP BY ALL) y
          ON x.g IS NOT DISTINCT FROM y.g AND x.c IS NOT DISTINCT FROM y.c
        ORDER BY 1 NULLS LAST, 2 NULLS LAST""").fetchall()
    return [{g: gv, "class_id": cv, "name": names.get(cv), "added": n_add, "removed": n_rm,
             "delta": n_add - n_rm} for gv, cv, n_add, n_rm in rows]


def label_change(con, run_a: str, run_b: str, snap: int, names: dict) -> dict:
    """Images labeled by both runs: how many changed predicted class, and the top moves."""
    both = f"""
        SELECT a.image_id, a.predicted AS pa, b.predicted AS pb,
               coalesce(i.gold_label, i.label) AS truth
        FROM (SELECT image_id, predicted FROM pseudo_labels AT (VERSION => {snap}) WHERE label_run = $ra) a
        JOIN (SELECT image_id, predicted FROM pseudo_labels AT (VERSION => {snap}) WHERE label_run = $rb) b
          USING (image_id)
        LEFT JOIN (SELECT image_id, gold_label, label FROM images AT (VERSION => {snap})) i USING (image_id)"""
    params = {"ra": run_a, "rb": run_b}
    common, changed, judged, right_a, right_b, fixed, broken = con.execute(f"""
        SELECT count(*), count(*) FILTER (pa IS DISTINCT FROM pb), count(truth),
               count(*) FILTER (pa = truth), count(*) FILTER (pb = truth),
               count(*) FILTER (pa <> truth AND pb = truth), count(*) FILTER (pa = truth AND pb <> truth)
        FROM ({both})""", params).fetchone()
    moves = [{"from_class": f, "from_name": names.get(f), "to_class": t, "to_name": names.get(t), "images": n}
             for f, t, n in con.execute(f"""
                SELECT pa, pb, count(*) AS n FROM ({both}) WHERE pa IS DISTINCT FROM pb
                GROUP BY pa, pb ORDER BY n DESC, pa, pb LIMIT 10""", params).fetchall()]
    out = {"run_a": run_a, "run_b": run_b, "common_images": common, "changed_class": changed,
           "unchanged": common - changed, "top_moves": moves}
    if judged:
        out.update(with_truth=judged, accuracy_a=right_a / judged, accuracy_b=right_b / judged,
                   fixed=fixed, broken=broken)
    return out


# --------------------------------------------------------------------------- sql


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The query if it is one plain SELECT over the store's tables, else UsageError saying why not.

    An allow-list on DuckDB's own parse tree (``json_serialize_sql``), not a keyword filter:
    tables must be the store's (or the query's own CTEs), table functions must be read-only
    ones from :data:`SQL_TABLE_FUNCTIONS`, and no function may name another catalog.
    """
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise UsageError(f"SQL does not parse: {first_line(exc)}") from None
    if len(statements) != 1:
        raise UsageError(f"give exactly one SQL statement, got {len(statements)}")
    stmt = statements[0]
    first = (re.sub(r"(/\*.*?\*/|--[^\n]*)", " ", query, flags=re.S).strip().split(None, 1) or [""])[0]
    first = first.upper().rstrip(";")
    if stmt.type not in _READ_TYPES or first in _REFUSED_KEYWORDS:
        kind = first if first in _REFUSED_KEYWORDS else stmt.type.name
        raise UsageError(f"nsd sql is read-only: {kind} statements are refused (use SELECT)")
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):
        raise UsageError(f"nsd sql is read-only: only plain SELECT statements are allowed "
                         f"({tree.get('error_message', 'not a SELECT')})")
    ctes = set()
    _walk(tree, lambda node: ctes.update(e["key"].lower() for e in node["cte_map"]["map"])
          if isinstance(node.get("cte_map"), dict) else None)
    _walk(tree, lambda node: _check_node(node, ctes))
    return query


def _walk(node, visit) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _check_node(node: dict, ctes: set[str]) -> None:
    kind = node.get("type")
    if kind == "BASE_TABLE":
        name = node.get("table_name", "")
        catalog, schema = node.get("catalog_name", ""), node.get("schema_name", "")
        own = name in TABLES and catalog in ("", "lake") and schema in ("", "main")
        if not own and not (name.lower() in ctes and not catalog and not schema and _IDENT.fullmatch(name)):
            shown = ".".join(p for p in (catalog, schema, name) if p)
            raise UsageError(f"nsd sql reads only the store's tables ({', '.join(TABLES)}), not {shown!r}")
    elif kind == "TABLE_FUNCTION":
        fn = node.get("function") or {}
        name = str(fn.get("function_name", "")).lower()
        if name not in SQL_TABLE_FUNCTIONS or fn.get("catalog") or fn.get("schema"):
            raise UsageError(f"nsd sql does not allow the table function {name}(): it may read other "
                             f"files or write (allowed: {', '.join(sorted(SQL_TABLE_FUNCTIONS))})")
    elif kind == "SHOW_REF" and node.get("table_name"):
        _check_node({**node, "type": "BASE_TABLE"}, ctes)
    elif node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name in _REFUSED_FUNCTIONS or node.get("catalog") or node.get("schema") not in ("", None, "main"):
            raise UsageError(f"nsd sql does not allow the function {name}()")


def sql(store: Store, query: str, at: str | int | None = None, params: list | dict | None = None,
        limit: int | None = None, timeout: float | None = None) -> list[dict]:
    """Run one read-only SELECT against the store (at snapshot AT) and return rows as dicts;
    :func:`sql_rows` streams them instead."""
    return list(sql_rows(store, query, at, params, limit, timeout))


def sql_rows(store: Store, query: str, at: str | int | None = None, params: list | dict | None = None,
             limit: int | None = None, timeout: float | None = None) -> Iterator[dict]:
    """The rows of one read-only SELECT against the store (at snapshot AT), as dicts, fetched
    1,024 at a time: memory does not grow with the result.

    The catalog is attached read-only and pinned; the query is checked against an allow-list
    (:func:`check_read_only`: the store's tables, read-only table functions, no PRAGMA, SET,
    COPY, ATTACH, ...); then file access and Python replacement scans are switched off and
    the configuration locked. ``params`` are bound (``?`` or ``$name``). ``limit`` stops
    fetching after that many rows; ``timeout`` (seconds, default ``$NSD_SQL_TIMEOUT`` or
    300) interrupts a query that runs longer. Values are raw Python (bytes for BLOBs); pass
    them through :func:`jsonable` for JSON.
    """
    if limit is not None and limit < 0:
        raise UsageError(f"--limit must be 0 or more, got {limit}")
    timeout = sql_timeout() if timeout is None else timeout
    snap = store.resolve(at)
    with store.reader(snap) as con:
        check_read_only(con, query)
        # The store is attached; from here the query may not read or write other files,
        # pick up Python variables as tables, or change any of this.
        con.execute("SET allowed_directories = ?", [[store.data_path]])
        con.execute("SET enable_external_access = false")
        con.execute("SET python_enable_replacements = false")
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            cur = con.execute(query, params) if params is not None else con.execute(query)
            columns = [d[0] for d in cur.description] if cur.description else []
            for row in _fetch(cur, limit):
                yield dict(zip(columns, row))
        except duckdb.InterruptException:
            raise UsageError(f"SQL stopped after {timeout:g} s (set $NSD_SQL_TIMEOUT to allow longer)") from None
        except duckdb.Error as exc:
            if timer.finished.is_set() and "interrupt" in str(exc).lower():
                raise UsageError(f"SQL stopped after {timeout:g} s (set $NSD_SQL_TIMEOUT to allow longer)") from None
            raise UsageError(f"SQL failed: {first_line(exc)}") from None
        finally:
            timer.cancel()


def _fetch(cur, limit: int | None) -> Iterator[tuple]:
    """Rows through Arrow: time zones come back as zoneinfo (DuckDB's own fetch needs pytz)."""
    n = 0
    for batch in cur.to_arrow_reader(1024):
        cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for row in zip(*cols):
            if limit is not None and n >= limit:
                return
            n += 1
            yield row


def sql_timeout() -> float:
    """$NSD_SQL_TIMEOUT (seconds > 0, default 300)."""
    return env_number("NSD_SQL_TIMEOUT", SQL_TIMEOUT_S, lo=0, lo_open=True, hi=1e7, must="a number of seconds > 0")


# --------------------------------------------------------------------------- helpers


def _scalar(con, query: str, params=None):
    return con.execute(query, params or []).fetchone()[0]


def _dicts(con, query: str, params=None) -> list[dict]:
    cur = con.execute(query, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def _named(names: dict, rows: list[dict]) -> list[dict]:
    """Per-class rows with each class id's name added."""
    for r in rows:
        r["name"] = names.get(r["class_id"])
    return rows


def _class_names(con) -> dict:
    return dict(con.execute("SELECT class_id, name FROM classes ORDER BY class_id").fetchall())


def _parse_json(text):
    try:
        return json.loads(text) if text else None
    except (TypeError, json.JSONDecodeError):
        return text
