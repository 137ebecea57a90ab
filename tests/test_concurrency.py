"""The store under concurrent processes: readers during writes, two writers, a busy catalog.

Real processes on a real SQLite DuckLake catalog. Every write below inserts rows into
`classes` and (through Store.write) one row into `runs` in the same transaction, so a
consistent snapshot always has classes == ROWS_PER_WRITE * runs: a read that saw part of a
commit would break that equation.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import nsd, nsd_process

# A writer process: waits for GO, then commits N writes of PER distinct class ids from START,
# each holding its transaction open for PAUSE seconds; prints the snapshot ids it committed.
WRITER = r"""
import json, os, sys, time
from nsd.engine.store import Store

store, start, n, per, pause, go = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5]), sys.argv[6]
while not os.path.exists(go):
    time.sleep(0.01)
s = Store(store)
snaps = []
for w in range(n):
    lo = start + w * per

    def fn(con, lo=lo):
        con.execute("INSERT INTO classes SELECT range, 'w' FROM range(?, ?)", [lo, lo + per])
        time.sleep(pause)
        return {"classes": per}

    snaps.append(s.write("cc-write", {"lo": lo}, fn, name=f"w{start}").snapshot_id)
print(json.dumps(snaps))
"""

# A reader process: one fresh connection per read (as separate commands would), until DONE
# exists, then one last read; prints [classes, runs] of every read.
READER = r"""
import json, os, sys
from nsd.engine.store import Store

store, done = sys.argv[1], sys.argv[2]
s = Store(store)
seen = []
while True:
    last = os.path.exists(done)
    with s.reader() as con:
        seen.append(con.execute(
            "SELECT (SELECT count(*) FROM classes), (SELECT count(*) FROM runs WHERE kind = 'cc-write')"
        ).fetchone())
    if last:
        break
print(json.dumps(seen))
"""

# Holds the catalog's write lock (as a writer in the middle of a long commit does) until RELEASE.
LOCK_HOLDER = r"""
import os, sqlite3, sys, time

catalog, ready, release = sys.argv[1:4]
con = sqlite3.connect(catalog, isolation_level=None)
con.execute("BEGIN IMMEDIATE")
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.02)
con.execute("ROLLBACK")
"""

# A writer that tags the latest snapshot with NSD_BUSY_TIMEOUT=60; it touches SEEN_BUSY the first
# time the catalog answers busy (the real retry path, only observed), then prints the snapshot.
PATIENT_WRITER = r"""
import json, sys
import nsd.engine.store as st

store, seen_busy = sys.argv[1:3]
is_retryable = st.is_retryable


def observed(exc):
    if is_retryable(exc):
        open(seen_busy, "w").close()
        return True
    return False


st.is_retryable = observed
print(json.dumps(st.Store(store).tag("after").snapshot_id))
"""

COUNTS_SQL = ("SELECT (SELECT count(*) FROM classes) AS classes, "
              "(SELECT count(*) FROM runs WHERE kind = 'cc-write') AS runs")


def py(code, *args, env=None):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return parse(out)


def parse(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {text!r}") from None


def nsd_busy(store, *args, timeout_s=None):
    """`nsd` as a process of its own, with NSD_BUSY_TIMEOUT=TIMEOUT_S when given."""
    env = dict(os.environ)
    if timeout_s is not None:
        env["NSD_BUSY_TIMEOUT"] = str(timeout_s)
    return nsd_process(store, *args, env=env)


def wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_readers_see_whole_commits_while_a_writer_commits(store, tmp_path):
    per, n = 50, 4
    go, done = tmp_path / "go", tmp_path / "done"
    reader = py(READER, store.root, done)
    writer = py(WRITER, store.root, 0, n, per, 0.3, go)
    go.touch()
    # Meanwhile, whole `nsd sql` commands (each its own process) read the moving store.
    cli_reads = []
    while writer.poll() is None:
        r = nsd_busy(store, "sql", COUNTS_SQL, "--json")
        assert r.returncode == 0, r.stderr
        cli_reads.append(tuple(parse(r.stdout)[0].values()))
    snaps = finish(writer)
    done.touch()
    reads = [tuple(x) for x in finish(reader)]

    assert len(snaps) == n and snaps == list(range(snaps[0], snaps[0] + n))
    for classes, runs in reads + cli_reads:
        assert classes == per * runs and 0 <= runs <= n  # whole commits only
    assert reads[-1] == (per * n, n)  # the read after the writer finished sees every commit
    commits = [runs for _, runs in reads]
    assert commits == sorted(commits)  # never goes back in time
    assert len(set(commits)) >= 2, reads  # the reads really overlapped the writes


@pytest.mark.slow
def test_two_writers_at_once_lose_nothing(store, tmp_path):
    per, n = 25, 3
    base = store.latest_snapshot()
    go = tmp_path / "go"
    writers = [py(WRITER, store.root, start, n, per, 0.2, go) for start in (0, 1000)]
    go.touch()
    a, b = (finish(w) for w in writers)

    # Every commit landed, as its own snapshot, numbered without gaps.
    assert sorted(a + b) == list(range(base + 1, base + 2 * n + 1))
    assert store.latest_snapshot() == base + 2 * n
    with store.reader() as con:
        ids = [r[0] for r in con.execute("SELECT class_id FROM classes ORDER BY class_id").fetchall()]
        assert con.execute("SELECT count(*) FROM runs WHERE kind = 'cc-write'").fetchone()[0] == 2 * n
    assert ids == [*range(0, n * per), *range(1000, 1000 + n * per)]  # no row lost or doubled
    # Each snapshot adds exactly one write's rows, with its own lineage.
    snaps = {s["snapshot_id"]: s for s in store.snapshots()}
    for k, sid in enumerate(range(base + 1, base + 2 * n + 1), start=1):
        with store.reader(sid) as con:
            assert con.execute("SELECT count(*) FROM classes").fetchone()[0] == k * per
        assert snaps[sid]["lineage"]["command"] == "cc-write"
        assert snaps[sid]["lineage"]["rows"] == {"classes": per}
    assert len({snaps[s]["lineage"]["run_id"] for s in a + b}) == 2 * n


@pytest.mark.slow
def test_busy_catalog_gives_store_busy_then_retry_succeeds(store, tmp_path):
    store.write("cc-write", {}, lambda con: con.execute("INSERT INTO classes VALUES (1, 'a')") and {"classes": 1})
    before = store.latest_snapshot()
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = py(LOCK_HOLDER, store.root / "catalog.sqlite", ready, release)
    try:
        wait_for(ready)
        # A writer with a tiny busy timeout gives up: one line, exit code 3.
        t0 = time.monotonic()
        r = nsd_busy(store, "tag", "during", timeout_s=0.2)
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert r.stderr.startswith("error: store busy") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert time.monotonic() - t0 < 60
        # Readers are not blocked by a commit in progress.
        r = nsd_busy(store, "sql", COUNTS_SQL, "--json")
        assert r.returncode == 0, r.stderr
        assert parse(r.stdout) == [{"classes": 1, "runs": 1}]
        # A writer with a longer timeout meets the lock, retries, and commits once it is released.
        seen_busy = tmp_path / "seen-busy"
        patient = py(PATIENT_WRITER, store.root, seen_busy, env={**os.environ, "NSD_BUSY_TIMEOUT": "60"})
        wait_for(seen_busy)
        assert patient.poll() is None
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert finish(patient) == before + 1

    # The refused write left nothing behind; the retried one is exactly one snapshot.
    assert store.latest_snapshot() == before + 1
    assert store.tags() == {"after": before}
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM classes").fetchone()[0] == 1
    # The catalog itself is sound.
    with sqlite3.connect(store.root / "catalog.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_bad_busy_timeout_is_one_line_exit_2(store, monkeypatch):
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("NSD_BUSY_TIMEOUT", bad)
        r = nsd(store, "tag", "t")
        assert r.exit_code == 2, r.output
        assert r.output == f"error: NSD_BUSY_TIMEOUT must be a number of seconds >= 0, got {bad!r}\n"
    monkeypatch.setenv("NSD_BUSY_TIMEOUT", "0.5")
    assert nsd(store, "tag", "t").exit_code == 0
