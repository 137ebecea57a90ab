"""Filter and balance a label run's pseudo labels into a training selection (`nsd balance`).

The selection is computed by one SQL query (schemas/balance.sql, or a user's own with
``sql_file``) over ``pseudo_labels`` and ``images`` pinned at one version, and written with
``INSERT INTO selections SELECT ... FROM (query)``: rows never pass through Python.

Semantics, for one label run, threshold t and K images per class:

* candidates of class c: rows predicted c with confidence > t, after dedup (one row per
  image: the most confident; ties by predicted class, then the row written first) and after
  dropping images that are in the labeled or test split;
* n_c >= K: the K most confident (ties by image_id), one copy each;
* 0 < n_c < K: all, floor(K / n_c) copies each plus one for the (K mod n_c) most confident,
  so the class totals K (one copy each without ``duplicate``);
* K defaults to the median of n_c over classes with n_c > 0, rounded down, at least 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from nsd.engine.dups import DEFAULT_DISTANCE, MAX_DISTANCE, create_near_test
from nsd.engine.dups import pin as pin_hashes
from nsd.engine.errors import UsageError, first_line
from nsd.engine.params import MAX_PER_CLASS, MIN_SHARPEN, check_options, option, with_options
from nsd.engine.runs import has_label_rows, latest_label_run
from nsd.engine.runtime import tune_malloc
from nsd.engine.store import Store, name_literal
from nsd.schemas import read_sql, sql_path

# The columns a selection query must return (everything in `selections` but its name), and
# the type families each may have.
COLUMNS = {
    "image_id": ("VARCHAR", "NULL"),
    "target": ("LIST_NUMERIC", "NULL"),
    "target_classes": ("LIST_INTEGER", "NULL"),
    "predicted": ("INTEGER", "NULL"),
    "confidence": ("NUMERIC", "NULL"),
    "copies": ("INTEGER",),
    "label_run": ("VARCHAR", "NULL"),
}
PARAMS = ("label_run", "threshold", "per_class", "duplicate", "hard", "sharpen", "selection")
_ALL = 2**62  # "no cap": K large enough to keep every candidate
_INTS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_NUMS = _INTS | {"FLOAT", "DOUBLE", "REAL"}


def balance_sql() -> str:
    """Text of the built-in selection query (schemas/balance.sql)."""
    return read_sql("balance")


@dataclass(frozen=True)
class BalanceParams:
    """What ``nsd balance`` selects (also ``--dry-run``); the defaults of every front end.

    labels: the version (snapshot or tag, default latest) to read pseudo_labels and images at.
    run: the label run (default: the most recent one at that version).
    threshold: keep pseudo labels with confidence > threshold, in [0, 1].
    per_class: K images per class (default: the median of the per-class candidate counts).
    duplicate: duplicate classes with fewer than K candidates up to K.
    hard: one-hot targets instead of soft probabilities.
    sharpen: soft targets p^(1/T), renormalised (T > 0; excludes ``hard``).
    sql_file: a user's selection query instead of schemas/balance.sql.
    leakage_distance: leave out unlabeled images whose perceptual hash is within this many
        bits of a test image's (engine/dups.py); None: no leakage gate.
    """

    labels: str | int | None = option(None, "Version (snapshot or tag) to read pseudo_labels and images at "
                                            "[default: latest].", metavar="REF")
    run: str | None = option(None, "Label run to balance [default: the most recent one at that version].",
                             metavar="RUN_ID")
    threshold: float = option(0.3, "Keep pseudo labels with confidence > threshold.", low=0, high=1)
    per_class: int | None = option(None, "Images per class [default: median of the per-class candidate counts].",
                                   low=1, high=MAX_PER_CLASS, whole=True, metavar="K")
    duplicate: bool = option(True, "Do not duplicate classes with fewer than K candidates.", flag="--no-duplicate")
    hard: bool = option(False, "One-hot targets instead of soft probabilities.", flag="--hard")
    sharpen: float | None = option(None, "Soft targets p^(1/T), renormalised.", low=MIN_SHARPEN, high=100,
                                   metavar="T")
    sql_file: str | None = option(None, "Run your own selection query (same inputs and $parameters as "
                                        "--show-sql).", name="--sql", metavar="FILE")
    leakage_distance: int | None = option(DEFAULT_DISTANCE, "Leave out unlabeled images whose perceptual hash is "
                                                            "within BITS of a test image's.",
                                          low=0, high=MAX_DISTANCE, whole=True, metavar="BITS",
                                          off="--no-leakage-gate",
                                          off_help="Keep near-copies of test images (only exact copies are "
                                                   "left out).")


def balance(store: Store, name: str, params: BalanceParams | None = None, *, allow_empty: bool = False,
            **options) -> dict:
    """Write selection NAME from one label run as one snapshot; returns a summary dict.

    What it selects is ``params`` or the fields of :class:`BalanceParams` given as keyword
    arguments (labels, run, threshold, per_class, duplicate, hard, sharpen, sql_file); either
    way the defaults are BalanceParams'. Refuses an existing NAME and an empty selection
    (unless ``allow_empty``).

        balance(store, "sel1", threshold=0.5, per_class=1000)
    """
    params = with_options(BalanceParams, params, options)
    this = f"selection = {name_literal(name, 'selection name')}"  # checks the name
    tune_malloc()  # DuckDB here allocates through glibc malloc
    with store.reader() as con:
        job = _prepare(con, store, params, need_counts=False)
    threshold = params.threshold
    snap, bound = job["snapshot"], dict(job["params"], selection=name)
    query = job["query"]
    lineage = dict(job["lineage"], name=name)

    def fn(con):
        if con.execute(f"SELECT 1 FROM selections WHERE {this} LIMIT 1").fetchone():
            raise UsageError(f"selection {name!r} already exists; choose another --name")
        _pin(con, snap)
        con.register("near_test", job["near_test"])
        # Lets DuckDB stream and spill the insert instead of keeping input order in memory.
        con.execute("SET preserve_insertion_order = false")
        cols = ", ".join(COLUMNS)
        try:
            con.execute(
                f"INSERT INTO lake.selections (selection, {cols}) SELECT $selection, {cols} FROM ({query}\n) q",
                _bind(query, bound, extra=("selection",)),
            )
        except duckdb.ConstraintException as exc:  # NOT NULL image_id / copies (schemas/tables.sql)
            raise UsageError(f"the selection query returned rows the selections table refuses: "
                             f"{first_line(exc)}") from None
        # One pass over what was written: totals, a check, and per class the copies (K when
        # the built-in query chose K itself: every class then totals K, or K rows without
        # duplication in the classes that had at least K candidates).
        rows, copies, classes, bad, nonfinite, k = con.execute(
            "SELECT coalesce(sum(n), 0), coalesce(sum(total_copies), 0), count(predicted), coalesce(sum(bad), 0), "
            "coalesce(sum(nonfinite), 0), coalesce(max(CASE WHEN $duplicate THEN total_copies ELSE n END), 1) FROM ("
            "SELECT predicted, count(*) AS n, sum(copies) AS total_copies, count(*) FILTER (WHERE copies < 1) AS bad, "
            "count(*) FILTER (WHERE list_bool_or(list_transform(target, lambda x: x IS NULL OR NOT isfinite(x) "
            "OR x < 0))) AS nonfinite "
            f"FROM lake.selections WHERE {this} GROUP BY predicted)",
            {"duplicate": bound["duplicate"]},
        ).fetchone()
        if bad:
            raise UsageError(f"the selection query returned {bad} rows with copies < 1")
        if nonfinite:  # a NaN target would pass as a label and make training diverge
            raise UsageError(f"{nonfinite} selected rows have targets that are not probabilities (NaN, infinite "
                             f"or negative values) in label run {bound['label_run']!r}: nothing was written")
        if bound["per_class"] is None:
            bound["per_class"] = lineage["per_class"] = int(k)
        if rows == 0 and not allow_empty:
            raise UsageError(
                f"selection would be empty: no row of label run {bound['label_run']!r} has confidence > "
                f"{bound['threshold']} (lower --threshold, or pass --allow-empty)"
            )
        summary = {"rows": int(rows), "copies": int(copies), "classes": int(classes),
                   "near_test_excluded": job["near_test_excluded"]}
        return {"selections": rows}, summary

    near = job["near_test_excluded"]
    commit = store.write("balance", lineage, fn, reads={"pseudo_labels": snap, "images": snap},
                         name=name, message=f"nsd balance {name} <- {bound['label_run']}"
                         + (f" ({near} near-copies of test images left out)" if near else ""))
    return {
        "selection": name,
        "snapshot_id": commit.snapshot_id,
        "run_id": commit.run_id,
        "label_run": bound["label_run"],
        "labels_version": snap,
        "per_class": bound["per_class"],
        "threshold": threshold,
        **commit.result,
    }


def plan(store: Store, params: BalanceParams | None = None, **options) -> dict:
    """What ``balance`` would select, per class, without writing (``--dry-run``); takes the
    same ``params`` or keyword arguments.

    Per class: ``candidates`` (rows of the run after dedup and leakage exclusion),
    ``after_threshold`` (n_c), ``kept`` (distinct images selected), ``copies_added`` (extra
    copies from duplication), ``dropped`` (n_c - kept: over K) and ``total`` (copies).
    """
    params = with_options(BalanceParams, params, options)
    with store.reader() as con:
        job = _prepare(con, store, params, need_counts=True)
        threshold = params.threshold
        bound, query, counts = job["params"], job["query"], job["counts"]
        sel = con.execute(
            f"SELECT predicted, count(*), sum(copies) FROM ({query}\n) q GROUP BY predicted",
            _bind(query, bound),
        ).fetchall()
    kept = {c: (int(n), int(s or 0)) for c, n, s in sel}
    classes = []
    for c in sorted(set(counts) | set(kept), key=lambda x: (x is None, x)):
        cand, above = counts.get(c, (0, 0))
        k, total = kept.get(c, (0, 0))
        classes.append({"class": c, "candidates": cand, "after_threshold": above, "kept": k,
                        "copies_added": total - k, "dropped": max(above - k, 0), "total": total})
    totals = {key: sum(row[key] for row in classes)
              for key in ("candidates", "after_threshold", "kept", "copies_added", "dropped", "total")}
    return {"label_run": bound["label_run"], "labels_version": job["snapshot"], "per_class": bound["per_class"],
            "threshold": threshold, "sql": job["lineage"]["sql"], "classes": classes, "totals": totals,
            "leakage_distance": params.leakage_distance, "near_test_excluded": job["near_test_excluded"]}


# --------------------------------------------------------------------------- internals


def _prepare(con, store, params: BalanceParams, need_counts: bool = True) -> dict:
    """Check the options, pin the version, find the run and K, load and check the query.

    Without ``need_counts``, a default K is left to the built-in query (``per_class`` None:
    it takes the same median in the same pass); a user's query is always given K.
    """
    params = _checked(params)
    labels, run, threshold, per_class = params.labels, params.run, params.threshold, params.per_class
    duplicate, hard, sharpen, sql_file = params.duplicate, params.hard, params.sharpen, params.sql_file
    query, path, digest = _load_query(sql_file)

    # `con` is at the latest snapshot; every read below is pinned by AT (VERSION => snap).
    snap = store.resolve(labels, con)
    _pin(con, snap)
    label_run = _find_run(con, snap, run)
    near_test, near_excluded = _near_test(con, snap, label_run, params.leakage_distance)
    bound = {"label_run": label_run, "threshold": threshold, "per_class": _ALL, "duplicate": False,
             "hard": False, "sharpen": None}
    # One pass of the built-in query with no threshold and no cap: n per class before
    # and after the threshold; K is the median of the latter (the SQL's own default).
    builtin = _strip(balance_sql())
    counts = {
        c: (int(a), int(b)) for c, a, b in con.execute(
            f"SELECT predicted, count(*), count(*) FILTER (WHERE confidence > $cut::DOUBLE) "
            f"FROM ({builtin}\n) q GROUP BY predicted",
            dict(bound, threshold=-1.0, cut=threshold),
        ).fetchall()
    } if need_counts or (per_class is None and sql_file) else {}
    given = per_class is not None
    if per_class is None and (need_counts or sql_file):
        above = [b for _, b in counts.values() if b > 0]
        per_class = max(1, math.floor(statistics.median(above))) if above else 1
    per_class = None if per_class is None else int(per_class)
    bound = {"label_run": label_run, "threshold": threshold, "per_class": per_class,
             "duplicate": bool(duplicate), "hard": bool(hard), "sharpen": sharpen}
    if sql_file:
        _check_columns(con, query, bound, sql_file)
    lineage = {"labels": None if labels is None else str(labels), "label_run": label_run,
               "threshold": threshold, "per_class": per_class, "per_class_default": not given,
               "duplicate": bool(duplicate), "hard": bool(hard), "sharpen": sharpen,
               "sql": path, "sql_sha256": digest, "leakage_distance": params.leakage_distance,
               "near_test_excluded": near_excluded}
    return {"snapshot": snap, "params": bound, "query": query, "counts": counts, "lineage": lineage,
            "near_test": near_test, "near_test_excluded": near_excluded}


def _near_test(con, snap: int, label_run: str, distance: int | None):
    """The leakage gate: (Arrow table of the unlabeled images near a test image, how many of
    them the label run labeled). Registered as `near_test` for the selection query."""
    if distance is None:
        con.execute("CREATE OR REPLACE TEMP TABLE near_test (image_id VARCHAR, test_image VARCHAR, distance INTEGER)")
    else:
        pin_hashes(con, snap)
        create_near_test(con, distance)
    table = con.execute("SELECT image_id FROM near_test ORDER BY image_id").to_arrow_table()
    excluded = con.execute("SELECT count(*) FROM near_test WHERE image_id IN "
                           "(SELECT image_id FROM pseudo_labels WHERE label_run = ?)", [label_run]).fetchone()[0]
    return table, int(excluded)


def _checked(params: BalanceParams) -> BalanceParams:
    """PARAMS with threshold and sharpen as floats; a usage error for any value out of range."""
    params = dataclasses.replace(params, threshold=_number(params.threshold, "--threshold"),
                                 sharpen=None if params.sharpen is None else _number(params.sharpen, "--sharpen"))
    check_options(params)
    if params.sharpen is not None and params.hard:
        raise UsageError("--hard and --sharpen exclude each other")
    return params


def _number(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(out):
        raise UsageError(f"{what} must be a number, got NaN")
    return out


def _load_query(sql_file: str | None) -> tuple[str, str, str]:
    """(query without trailing semicolon, path, sha256) of the built-in or a user's SQL."""
    if sql_file is None:
        path, text = sql_path("balance"), balance_sql()
    else:
        path = str(Path(sql_file).expanduser().resolve())
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read --sql file {sql_file}: {exc.strerror}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise UsageError(f"{path}: {first_line(exc)}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise UsageError(f"{path}: must hold exactly one SELECT query")
    return _strip(text), path, digest


def _strip(text: str) -> str:
    """The query without its final semicolon, so that it can be wrapped in ( ... )."""
    text = text.rstrip()
    while True:  # drop trailing comment lines, then the semicolon
        lines = text.splitlines()
        if lines and lines[-1].lstrip().startswith("--"):
            text = "\n".join(lines[:-1]).rstrip()
            continue
        break
    return re.sub(r";\s*(--[^\n]*)?$", "", text).rstrip()


def _pin(con: duckdb.DuckDBPyConnection, snap: int) -> None:
    """Make `pseudo_labels` and `images` mean those tables at version ``snap``."""
    # rowid passes through, as on the tables themselves: the built-in query identifies rows by it.
    for table in ("pseudo_labels", "images"):
        con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS SELECT *, rowid FROM lake.{table} AT (VERSION => {int(snap)})")


def _bind(query: str, params: dict, extra: tuple = ()) -> dict:
    """The named parameters the query uses (DuckDB refuses unused ones)."""
    used = set(re.findall(r"\$([A-Za-z_]\w*)", query)) | set(extra)
    unknown = used - set(PARAMS)
    if unknown:
        raise UsageError(f"unknown parameter(s) in the query: {', '.join('$' + u for u in sorted(unknown))}; "
                         f"available: {', '.join('$' + p for p in PARAMS)}")
    return {k: params.get(k) for k in used}


def _find_run(con: duckdb.DuckDBPyConnection, snap: int, run: str | None) -> str:
    """RUN if it has rows at SNAP, else the latest label run there (runs.latest_label_run)."""
    if run is not None:
        if not has_label_rows(con, run, snap):
            known = [r[0] for r in con.execute(
                "SELECT DISTINCT label_run FROM pseudo_labels ORDER BY 1 LIMIT 6").fetchall()]
            hint = f" (label runs: {', '.join(known[:5])}{', ...' if len(known) > 5 else ''})" if known else ""
            raise UsageError(f"unknown label run {run!r} at version {snap}{hint}")
        return run
    latest = latest_label_run(con, snap)
    if latest is None:
        raise UsageError(f"no pseudo labels at version {snap} (run `nsd label` first)")
    return latest


def _family(type_: str) -> str:
    t = type_.upper()
    if t == '"NULL"' or t == "NULL":
        return "NULL"
    if t.endswith("[]"):
        inner = _family(t[:-2])
        return {"INTEGER": "LIST_INTEGER", "NUMERIC": "LIST_NUMERIC"}.get(inner, "LIST_" + inner)
    if t in _INTS:
        return "INTEGER"
    if t in _NUMS or t.startswith("DECIMAL"):
        return "NUMERIC"
    return t


def _check_columns(con, query: str, params: dict, path: str) -> None:
    """A user's query must return exactly the selection's columns, with compatible types."""
    try:
        described = con.execute(f"DESCRIBE ({query}\n)", _bind(query, params)).fetchall()
    except duckdb.Error as exc:
        raise UsageError(f"{path}: {first_line(exc)}") from None
    types = {row[0]: row[1] for row in described}
    missing = [c for c in COLUMNS if c not in types]
    extra = [c for c in types if c not in COLUMNS]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise UsageError(f"{path}: the query must return columns {', '.join(COLUMNS)}; {'; '.join(parts)}")
    for col, allowed in COLUMNS.items():
        fam = _family(types[col])
        ok = fam in allowed or (fam == "LIST_INTEGER" and "LIST_NUMERIC" in allowed) \
            or (fam == "INTEGER" and "NUMERIC" in allowed) or (fam == "LIST_NULL" and col != "copies")
        if not ok:
            raise UsageError(f"{path}: column {col} has type {types[col]}, which does not fit selections.{col}")
