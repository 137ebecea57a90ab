"""Label runs from elsewhere (`nsd label --from FILE --teacher NAME`): soft labels that a
teacher computed outside nsd (a bigger model, another framework, a GPU cluster) come in as an
ordinary label run, so balance, report and train treat them like any other.

Every row is checked in DuckDB (schemas/external_labels.sql): a known image of the unlabeled
pool, no duplicate ids, a dense probability vector of the store's class count whose values
are finite, non-negative and sum to 1 within ``tolerance``. The good rows become one label run
in one snapshot, with lineage "external teacher NAME"; the refused rows are counted and named
(the first ``MAX_NAMED`` in the result and the run's parameters). Nothing is committed when no
row is good.
"""

from __future__ import annotations

import uuid

import duckdb

from nsd.engine.errors import UsageError, first_line
from nsd.engine.paths import url
from nsd.engine.store import Store, check_name
from nsd.schemas import read_sql

TOLERANCE = 1e-3
MAX_NAMED = 20
STRAY_ROWS = 10_000  # rows beyond the pool's size an import may hold (see max_rows)
EXTERNAL = "external:"  # the teacher column of an imported run: external:<name>


def import_labels(store: Store, path: str, teacher: str, *, tolerance: float = TOLERANCE) -> dict:
    """Import PATH (a Parquet file, or a directory of them) as a label run by external TEACHER."""
    check_name(teacher, "teacher name")
    if not 0 < tolerance < 1:
        raise UsageError(f"--tolerance must be in (0, 1), got {tolerance}")
    store.require()
    files = _parquet_files(path)
    run_id = f"label-ext-{uuid.uuid4().hex[:12]}"
    query = read_sql("external_labels").rstrip().rstrip(";")

    def fn(con):
        num_classes = con.execute("SELECT count(*) FROM classes").fetchone()[0]
        if not num_classes:
            raise UsageError("the store has no classes yet: ingest labeled images first")
        params = {"files": files, "num_classes": num_classes, "tolerance": tolerance}
        _check_row_count(con, path, files)
        try:
            con.execute(f"CREATE TEMP TABLE ext AS {query}", params)
        except duckdb.Error as exc:
            raise UsageError(f"{path}: needs Parquet columns image_id and probs (a list of numbers): "
                             f"{first_line(exc)}") from None
        good, bad = con.execute("SELECT count(*) FILTER (WHERE reason IS NULL), count(*) FILTER "
                                "(WHERE reason IS NOT NULL) FROM ext").fetchone()
        named = con.execute("SELECT image_id, reason FROM ext WHERE reason IS NOT NULL ORDER BY image_id "
                            "LIMIT ?", [MAX_NAMED]).fetchall()
        if not good:
            raise UsageError(f"{path}: no row is a usable soft label ({bad} refused; first: "
                             f"{named[0][0]!r}: {named[0][1]})" if named else f"{path}: no rows")
        con.execute(
            "INSERT INTO pseudo_labels SELECT image_id, ?, ?, NULL, probs::FLOAT[], NULL, "
            "list_position(probs, list_max(probs)) - 1, list_max(probs), "
            "list_max(probs) - coalesce(list_sort(probs, 'DESC')[2], 0), "
            "-list_sum(list_transform(probs, lambda p: CASE WHEN p > 0 THEN p * ln(p) ELSE 0 END)) "
            "FROM ext WHERE reason IS NULL ORDER BY image_id", [run_id, EXTERNAL + teacher])
        con.execute("DROP TABLE ext")
        summary = {"rows": good, "rejected": bad, "rejects": [{"image_id": i, "reason": r} for i, r in named]}
        return {"pseudo_labels": good}, summary

    lineage = {"teacher": EXTERNAL + teacher, "external": True, "from": str(path), "files": len(files),
               "tolerance": tolerance}
    commit = store.write("label", lineage, fn, run_id=run_id, name=EXTERNAL + teacher,
                         message=f"nsd label --from {path} (external teacher {teacher})")
    return {"run_id": run_id, "snapshot_id": commit.snapshot_id, "teacher": EXTERNAL + teacher, **commit.result}


def _check_row_count(con, path: str, files: list[str]) -> None:
    """Refuse, before reading a row, files whose footers claim far more rows than the pool has
    images: a run holds one row per image, and strays (unknown or repeated ids) are named, not
    unbounded. A forged billion-row claim never becomes a billion-row temporary table."""
    try:
        claimed = con.execute("SELECT sum(num_rows) FROM parquet_file_metadata(?)", [files]).fetchone()[0] or 0
    except duckdb.Error as exc:
        raise UsageError(f"{path}: not readable as Parquet: {first_line(exc)}") from None
    pool = con.execute("SELECT count(*) FROM images WHERE split = 'unlabeled'").fetchone()[0]
    if claimed > max_rows(pool):
        raise UsageError(f"{path}: {claimed:,} rows, but the pool has {pool:,} images (at most "
                         f"{max_rows(pool):,} rows: twice the pool plus {STRAY_ROWS:,}); nothing was read")


def max_rows(pool: int) -> int:
    """The most rows an import of soft labels for a pool of POOL images may hold."""
    return 2 * pool + STRAY_ROWS


def _parquet_files(path: str) -> list[str]:
    """PATH itself, or the *.parquet files under the directory PATH (sorted)."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(str(path))
        if fs.isdir(p):
            found = sorted(f for f in fs.find(p) if f.endswith(".parquet"))
        elif fs.isfile(p):
            found = [p]
        else:
            raise UsageError(f"{path}: no such file or directory")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{path}: {first_line(exc)}") from None
    if not found:
        raise UsageError(f"{path}: holds no .parquet file")
    return [url(fs, f) for f in found]


def is_external(teacher: str | None) -> bool:
    return bool(teacher) and teacher.startswith(EXTERNAL)

