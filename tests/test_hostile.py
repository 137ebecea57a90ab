"""Hostile and careless input through the CLI: read-only SQL, what ingest reads and decodes,
labels, data printed literally, bounds on options, tags, init, leftovers."""

import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import add_images, new_store, no_hang, nsd, one_line_error, png_bytes, rows


def png_header(w, h, bit_depth=8):
    """A PNG that declares W x H pixels but holds no pixel data: cheap to make, costly to decode."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_files(store):
    return sorted(p for p in (store.root / "data").rglob("*") if p.is_file())


# --------------------------------------------------------------------------- nsd sql


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return new_store(tmp_path_factory.mktemp("sql") / "store", {"labeled": 1, "unlabeled": 2}, num_classes=2)


@pytest.mark.parametrize("query, message", [
    ("SELECT * FROM sqlite_scan('{db}', 'creds')", "table function sqlite_scan"),
    ("SELECT * FROM sqlite_query('{db}', 'SELECT * FROM creds')", "table function sqlite_query"),
    ("SELECT * FROM images WHERE image_id IN (SELECT secret FROM sqlite_scan('{db}', 'creds'))",
     "table function sqlite_scan"),
    ("SELECT * FROM '{db}'", "only the store's tables"),
    ("SELECT * FROM read_parquet('{data}/**/*.parquet')", "table function read_parquet"),
    ("SELECT * FROM glob('/etc/*')", "table function glob"),
    ("SELECT * FROM query('SELECT 1')", "table function query"),
    ("SELECT * FROM __ducklake_metadata_lake.ducklake_snapshot", "only the store's tables"),
    ("/* c */ PRAGMA version", "read-only"),
    ("/* a */ -- c\nSET threads = 1", "read-only"),
    ("SELECT 1; ATTACH '{db}' AS other", "exactly one"),
])
def test_sql_reads_only_the_store(small, tmp_path, query, message):
    db = tmp_path / "creds.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE creds (secret TEXT)")
        con.execute("INSERT INTO creds VALUES ('hunter2')")
    out = nsd(small, "sql", query.format(db=db, data=small.root / "data"))
    one_line_error(out, 2, message)
    assert "hunter2" not in out.output


def test_sql_maintenance_functions_write_nothing(small):
    before_files, before_snap = data_files(small), small.latest_snapshot()
    for fn in ("ducklake_merge_adjacent_files('lake')", "ducklake_rewrite_data_files('lake')",
               "ducklake_flush_inlined_data('lake')", "ducklake_cleanup_old_files('lake', cleanup_all => true)"):
        one_line_error(nsd(small, "sql", f"SELECT * FROM {fn}"), 2, "table function")
    assert data_files(small) == before_files and small.latest_snapshot() == before_snap


def test_sql_plain_selects_still_work(small):
    out = nsd(small, "sql", "SELECT now() AS t, current_date AS d", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["t"][:4].isdigit()
    out = nsd(small, "sql", "WITH c AS (SELECT split, count(*) AS n FROM images GROUP BY split) "
                            "SELECT * FROM c JOIN (SELECT 'labeled' AS split) USING (split)", "--json")
    assert json.loads(out.output) == [{"split": "labeled", "n": 2}]
    out = nsd(small, "sql", "SELECT snapshot_id, snapshot_time FROM ducklake_snapshots('lake') "
                            "ORDER BY 1 DESC LIMIT 1", "--json")
    assert out.exit_code == 0 and json.loads(out.output)[0]["snapshot_id"] == small.latest_snapshot()
    out = nsd(small, "sql", "SELECT count(*) AS n FROM images AT (VERSION => 1)", "--json")
    assert json.loads(out.output) == [{"n": 0}]


def test_sql_stops_a_runaway_query(small, monkeypatch):
    monkeypatch.setenv("NSD_SQL_TIMEOUT", "1")
    one_line_error(nsd(small, "sql", "SELECT count(*) FROM range(1000000000000)"), 2, "stopped after 1 s")


# --------------------------------------------------------------------------- ingest: what is read


def test_ingest_reads_only_regular_files_within_caps(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(png_bytes(np.full((8, 8), 9, np.uint8)))
    (src / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(src / "fifo.png")
    (src / "bomb.png").write_bytes(png_header(13000, 13000))
    (src / "wide.png").write_bytes(png_header(8000, 8000))
    (src / "fat.png").write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    (src / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    with no_hang(60):
        out = nsd(store, "ingest", src, "--max-bytes", 2000, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["added"]["unlabeled"] == 1
    reasons = dict(rows(store, "SELECT regexp_extract(source, '[^/]+$'), reason FROM rejects"))
    assert reasons["zero.png"].startswith("not a regular file")
    assert reasons["fifo.png"].startswith("not a regular file")
    assert reasons["bomb.png"].startswith("too many pixels")
    assert reasons["wide.png"] == "too many pixels: 8000x8000 = 64,000,000 > 50,000,000 (--max-pixels)"
    assert reasons["fat.png"].startswith("too large:") and "--max-bytes" in reasons["fat.png"]
    assert reasons["x.eps"].startswith("undecodable: not an image in a supported format")


def test_ingest_pixel_cap_from_the_environment(store, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(np.zeros((10, 10), np.uint8)))
    monkeypatch.setenv("NSD_MAX_IMAGE_PIXELS", "99")
    out = nsd(store, "ingest", src, "--json")
    assert json.loads(out.output)["rejected"] == 1
    monkeypatch.setenv("NSD_MAX_IMAGE_PIXELS", "lots")
    one_line_error(nsd(store, "ingest", src), 2, "NSD_MAX_IMAGE_PIXELS")


def test_parquet_paths_stay_inside_the_source_directory(store, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(np.full((8, 8), 1, np.uint8)))
    src = tmp_path / "pq"
    (src / "img").mkdir(parents=True)
    (src / "img" / "in.png").write_bytes(png_bytes(np.full((8, 8), 2, np.uint8)))
    (src / "img" / "link.png").symlink_to(outside)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([
        {"bytes": None, "path": "img/in.png"},
        {"bytes": None, "path": str(outside)},
        {"bytes": None, "path": "../secret.png"},
        {"bytes": None, "path": "img/link.png"},
        {"bytes": None, "path": "/dev/zero"},
    ], image)})
    pq.write_table(table, src / "data.parquet")
    out = nsd(store, "ingest", src / "data.parquet", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["added"]["unlabeled"] == 1
    reasons = [r[0] for r in rows(store, "SELECT reason FROM rejects ORDER BY source")]
    assert len(reasons) == 4 and all("outside" in r for r in reasons), reasons
    # told otherwise, the same file may read the outside image
    out = nsd(store, "ingest", src / "data.parquet", "--image-root", tmp_path, "--json")
    assert json.loads(out.output)["added"]["unlabeled"] == 1


# --------------------------------------------------------------------------- ingest: what is decoded


def test_sixteen_bit_png_is_scaled_not_clipped(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(deep).save(src / "deep.png")
    assert Image.open(src / "deep.png").mode == "I;16"
    assert nsd(store, "ingest", src).exit_code == 0
    (data, channels), = rows(store, "SELECT bytes, channels FROM images")
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(int)
    assert channels == 1
    assert np.abs(pixels - deep / 257).max() <= 1  # not 99% white


def test_mixed_modes_count_as_one_or_three_channels(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (8, 8), (1, 2, 3, 200)).save(src / "rgba.png")
    Image.new("CMYK", (8, 8), (1, 2, 3, 4)).save(src / "cmyk.jpg")
    Image.new("P", (8, 8), 5).save(src / "p.gif")
    Image.new("LA", (8, 8), (5, 6)).save(src / "la.png")
    Image.new("RGB", (8, 8), (7, 8, 9)).save(src / "rgb.png")
    Image.new("L", (8, 8), 10).save(src / "l.png")
    assert nsd(store, "ingest", src).exit_code == 0
    got = dict(rows(store, "SELECT regexp_extract(source, '[^/]+$'), channels FROM images"))
    assert got == {"rgba.png": 3, "cmyk.jpg": 3, "p.gif": 3, "la.png": 1, "rgb.png": 3, "l.png": 1}
    assert rows(store, "SELECT max(channels) FROM images") == [(3,)]


def test_parquet_labels_must_be_whole_and_under_the_class_cap(store, tmp_path):
    images = [png_bytes(np.full((8, 8), v, np.uint8)) for v in range(5)]
    pq.write_table(pa.table({"image": images, "label": [0.0, 0.9, 1.0, 1e9, 2.5]}), tmp_path / "f.parquet")
    out = nsd(store, "ingest", tmp_path / "f.parquet", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["added"]["labeled"] == 2
    assert rows(store, "SELECT count(*) FROM classes") == [(2,)]
    reasons = sorted(r[0] for r in rows(store, "SELECT reason FROM rejects"))
    assert reasons == ["label 0.9 is not a whole number", "label 1000000000 is over the class cap: at most "
                       "10000 classes (--max-classes)", "label 2.5 is not a whole number"]
    pq.write_table(pa.table({"image": images[:3], "label": ["a", "b", "c"]}), tmp_path / "s.parquet")
    other = new_store(tmp_path / "other")
    out = nsd(other, "ingest", tmp_path / "s.parquet", "--max-classes", 2, "--json")
    assert json.loads(out.output)["classes_added"] == 2
    assert rows(other, "SELECT reason FROM rejects") == [("too many classes: more than 2 (--max-classes)",)]


# --------------------------------------------------------------------------- data printed literally


def test_names_print_literally(store, tmp_path):
    pq.write_table(pa.table({"image": [png_bytes(np.full((8, 8), v, np.uint8)) for v in range(2)],
                             "label": ["[/oops]", "[bold]c0"]}), tmp_path / "m.parquet")
    assert nsd(store, "ingest", tmp_path / "m.parquet").exit_code == 0
    store.tag("t1")
    for args in (["show", "images"], ["show", "classes"], ["head", "classes"], ["versions"],
                 ["sql", "SELECT name, ':smile:' AS e FROM classes"], ["diff", "images", "1"]):
        out = nsd(store, *args)
        assert out.exit_code == 0, (args, out.output)
        assert out.output.count("[/oops]") == out.output.count("[bold]c0") >= (args != ["versions"]), args
        if args[0] == "sql":
            assert ":smile:" in out.output
    folder = tmp_path / "f"
    (folder / "[bold]c0").mkdir(parents=True)
    (folder / "[bold]c0" / "a.png").write_bytes(png_bytes(np.full((8, 8), 3, np.uint8)))
    other = new_store(tmp_path / "[/b]store")
    assert nsd(other, "ingest", folder).exit_code == 0
    for args, shown in ((["show", "images"], "[bold]c0"), (["versions"], "[/b]store"),
                        (["head", "images"], "[bold]c0/a.png")):
        out = nsd(other, *args)
        assert out.exit_code == 0 and shown in out.output, (args, out.output)


# --------------------------------------------------------------------------- bounds on options


@pytest.mark.parametrize("args, message", [
    (["balance", "--per-class", "1000000000", "--name", "x"], "--per-class"),
    (["balance", "--threshold", "nan", "--name", "x"], "not a finite number"),
    (["balance", "--sharpen", "inf", "--name", "x"], "not a finite number"),
    (["ingest", "fashion-mnist", "--workers", "99999999999999999999"], "--workers"),
    (["ingest", "fashion-mnist", "--max-pixels", "0"], "--max-pixels"),
    (["train", "--model", "test_resnet", "--name", "m", "--lr", "inf"], "not a finite number"),
    (["train", "--model", "test_resnet", "--name", "m", "--lr", "nan"], "not a finite number"),
    (["train", "--model", "test_resnet", "--name", "m", "--lr", "1e30"], "--lr"),
    (["train", "--model", "test_resnet", "--name", "m", "--weight-decay", "inf"], "not a finite number"),
    (["train", "--model", "test_resnet", "--name", "m", "--ema", "nan"], "not a finite number"),
    (["train", "--model", "test_resnet", "--name", "m", "--seed", "-1"], "--seed"),
    (["train", "--model", "test_resnet", "--name", "m", "--batch-size", "100000000000000000000"], "--batch-size"),
    (["eval", "m", "--batch-size", "1e20"], "--batch-size"),
    (["eval", "m", "--batch-size", "100000000000000000000"], "--batch-size"),
    (["label", "--teacher", "m", "--temperature", "nan"], "not a finite number"),
    (["label", "--teacher", "m", "--batch-size", "100000000000000000000"], "--batch-size"),
    (["loop", "--threshold", "inf"], "not a finite number"),
    (["head", "images", "-n", "1e20"], "-n"),
    (["head", "images", "-n", "100000000000000000000"], "-n"),
    (["sql", "SELECT 1", "--limit", "100000000000000000000"], "--limit"),
    (["versions", "--last", "100000000000000000000"], "--last"),
    (["show", "images@0"], "older than the store's tables"),
    (["show", "images@v0"], "older than the store's tables"),
    (["head", "images@99999999999999999999999"], "unknown version"),
])
def test_option_bounds_are_one_line_exit_2(small, args, message):
    before = small.latest_snapshot()
    one_line_error(nsd(small, *args), 2, message)
    assert small.latest_snapshot() == before


def test_a_diverging_run_registers_nothing(store):
    from nsd.engine.guards import Diverged
    from nsd.engine.train import TrainConfig, train

    add_images(store, {"labeled": 4, "test": 1}, num_classes=2, size=8)
    before = store.latest_snapshot()
    cfg = TrainConfig(name="boom", arch="test_resnet", lr=1e30, steps=3, batch_size=8, workers=0,
                      progress=False, eval_split=None)
    with pytest.raises(Diverged, match="training diverged"):
        train(store, cfg)
    assert store.latest_snapshot() == before
    assert rows(store, "SELECT count(*) FROM models") == [(0,)]


# --------------------------------------------------------------------------- tags and init


def test_tags_that_could_never_resolve_are_refused(small):
    for name in ("latest", "v5", "5", "v0012", "V5", "LATEST", "Latest"):  # reserved in any case
        one_line_error(nsd(small, "tag", name), 2, "invalid tag")
    assert small.resolve("V2") == small.resolve("v2") == 2 and small.resolve("LATEST") == small.latest_snapshot()
    latest = small.latest_snapshot()
    out = nsd(small, "tag", "good", "--version", "2")
    assert out.exit_code == 0 and out.output.startswith("tagged snapshot 2 as good"), out.output
    out = nsd(small, "tag", "good2", "--json")
    assert json.loads(out.output)["snapshot_id"] == latest + 1  # the newest when asked: the first tag's commit
    assert nsd(small, "sql", "SELECT 1", "--at", "good").exit_code == 0


def test_init_on_a_path_that_is_not_a_store(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    for path in (tmp_path / "file", tmp_path / "dir", tmp_path / "file" / "sub"):
        out = nsd(path, "init")
        one_line_error(out, 2, "cannot create a store")
    assert (tmp_path / "file").read_text() == "x" and sorted(os.listdir(tmp_path / "dir")) == ["notes.txt"]
    out = nsd(tmp_path / "new", "init")
    assert out.exit_code == 0
    out = nsd(tmp_path / "new", "init")
    assert out.exit_code == 0 and "already exists" in out.output


# --------------------------------------------------------------------------- leftovers


@pytest.mark.slow
def test_staging_of_a_killed_process_is_removed_by_the_next_command(store, tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys\nfrom nsd.engine.store import Store\n"
            "with Store(sys.argv[1]).staging() as d:\n"
            "    (d / 'part.parquet').write_bytes(b'x' * 100000)\n"
            "    print(d, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store.root)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    killed = proc.stdout.strip()
    assert os.path.isdir(killed) and f"-{os.getpid()}-" not in killed
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(np.full((8, 8), 4, np.uint8)))
    with store.staging() as mine:  # a live command's staging is left alone
        assert nsd(store, "ingest", src).exit_code == 0
        assert not os.path.exists(killed) and mine.is_dir()


def test_gc_lists_then_removes_only_leftovers(store, tmp_path):
    import shutil
    import time

    add_images(store, {"labeled": 2}, num_classes=2)
    kept = data_files(store)
    assert kept
    orphan = kept[0].with_name("ducklake-left-by-a-kill.parquet")
    shutil.copy(kept[0], orphan)
    young = kept[0].with_name("ducklake-being-committed.parquet")
    shutil.copy(kept[0], young)
    tmp = store.root / "data" / "checkpoints" / "m" / "train_state.pt.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half")
    stale = store.root / "staging" / "stage-old"
    stale.mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    for p in (orphan, tmp, stale):
        os.utime(p, (two_hours_ago, two_hours_ago))
    before = rows(store, "SELECT count(*) FROM images")

    out = nsd(store, "gc", "--json")
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["dry_run"] and plan["orphaned_files"] == [str(orphan)]
    assert plan["tmp_files"] == [str(tmp)] and plan["staging"] == [str(stale)]
    assert plan["bytes"]["orphaned_files"] == orphan.stat().st_size
    assert orphan.exists() and tmp.exists() and stale.exists()

    out = nsd(store, "gc", "--delete")
    assert out.exit_code == 0 and "removed 1 orphaned files" in out.output, out.output
    assert not orphan.exists() and not tmp.exists() and not stale.exists()
    assert young.exists() and all(p.exists() for p in kept)
    assert rows(store, "SELECT count(*) FROM images") == before
    one_line_error(nsd(store, "gc", "--older-than", "soon"), 2, "invalid duration")


def test_gc_spares_what_a_command_on_another_host_needs(store):
    """A team shares the data path: gc on one machine once deleted the files of a command
    running on another. Heartbeats at the data path say what runs where; a stale one (a
    killed command) protects nothing and is removed."""
    import shutil
    import time

    add_images(store, {"labeled": 2}, num_classes=2)
    part = store.root / "data" / "label-runs" / "label-abc" / "s8" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    shutil.copy(data_files(store)[0], part)
    day_ago = time.time() - 86400
    os.utime(part, (day_ago - 86400, day_ago - 86400))  # a resumed run's part: older than its start
    beat = store.root / "data" / "live" / "node7-123-abcd.json"
    beat.parent.mkdir()
    beat.write_text(json.dumps({"command": "label", "host": "node7", "pid": 123, "started": day_ago + 10,
                                "protects": ["label-runs/label-abc/"]}))

    out = nsd(store, "gc", "--older-than", "0", "--delete")
    assert out.exit_code == 0, out.output
    assert f"kept {part}: label running on node7 (pid 123) needs it" in out.output
    assert "removed 0 orphaned files" in out.output and part.exists() and beat.exists()

    os.utime(beat, (time.time() - 600, time.time() - 600))  # node7 stopped beating: killed
    out = nsd(store, "gc", "--older-than", "0", "--delete")
    assert out.exit_code == 0 and "removed 1 orphaned files" in out.output, out.output
    assert not part.exists() and not beat.exists()
    for junk in ("not json", json.dumps({"started": "x", "protects": "label-runs/"}), json.dumps([1])):
        beat.write_text(junk)  # fresh but not a heartbeat: protects nothing, removed as a leftover
        out = nsd(store, "gc", "--older-than", "0", "--delete", "--json")
        assert out.exit_code == 0 and json.loads(out.stdout)["tmp_files"] == [str(beat)], out.output
        assert not beat.exists()


def test_store_locations_that_are_no_catalog_are_refused(tmp_path, monkeypatch):
    """`--store s3://b/x` once made a local ./s3:/b/x and `--store ""` meant ./nsd-store."""
    monkeypatch.chdir(tmp_path)
    for uri, message in (("s3://bucket/x", "s3: URLs are not catalogs"), ("https://host/x", "https: URLs"),
                         ("", "--store is empty"), ("   ", "--store is empty")):
        one_line_error(nsd(uri, "init"), 2, message)
        if uri.strip():  # an empty variable counts as unset, as for any variable
            one_line_error(nsd(None, "versions", env={"NSD_STORE": uri}), 2, message)
    assert list(tmp_path.iterdir()) == []  # nothing created anywhere


def test_json_output_is_strict_json(small):
    """NaN and infinities are not JSON: --json writes null for them."""
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    out = nsd(small, "sql", "SELECT 'nan'::DOUBLE AS a, '-inf'::DOUBLE AS b, 2.5 AS c, ['inf'::DOUBLE, 1.0] AS l",
              "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout, parse_constant=refuse) == [{"a": None, "b": None, "c": 2.5, "l": [None, 1.0]}]


def test_terminal_escapes_in_data_are_shown_not_obeyed(store):
    """A class named ESC ] 0 ; ... BEL once retitled the terminal through show, sql and head."""
    add_images(store, {"labeled": 1}, num_classes=2)
    evil = ["\x1b]0;PWNED\x07", "\x1b[31mred\u202eevil"]

    def fn(con):
        for class_id, name in enumerate(evil):
            con.execute("UPDATE classes SET name = ? WHERE class_id = ?", [name, class_id])
        return {"classes": 2}

    store.write("rename", {}, fn)
    for args in (["show", "images"], ["sql", "SELECT name FROM classes"], ["head", "classes"]):
        out = nsd(store, *args)
        assert out.exit_code == 0, out.output
        assert "\x1b" not in out.output and "\x07" not in out.output and "\u202e" not in out.output, args
        assert "\\x1b]0;PWNED\\x07" in out.output and "\\x1b[31mred\\u202eevil" in out.output, (args, out.output)
    err = nsd(store, "sql", "SELECT * FROM \"\x1b[2Jgone\"")
    assert err.exit_code != 0 and "\x1b" not in err.output


def test_reads_follow_the_file_size_not_the_cap(tmp_path):
    """Loading a 1.5 MB model once reserved the whole 8 GiB weights cap (f.read(cap + 1))."""
    small = tmp_path / "w.bin"
    small.write_bytes(b"x" * 1_500_000)
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from nsd.engine.paths import read_capped
with open({str(small)!r}, "rb", buffering=0) as f:
    assert len(read_capped(f, 8 << 30)) == 1_500_000
with open({str(small)!r}, "rb", buffering=0) as f:
    assert read_capped(f, 1_000_000) is None
try:
    with open({str(small)!r}, "rb", buffering=0) as f:
        f.read((8 << 30) + 1)
except MemoryError:
    print("one read of the cap fails")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "one read of the cap fails"  # what the old code did


def test_one_bad_item_never_aborts_an_ingest(store, tmp_path):
    """A link to a directory among a folder's files, a Parquet path naming a directory or
    holding a NUL byte: each becomes a `rejects` row and the good images still go in."""
    src = tmp_path / "h3"
    for c in ("c0", "c1"):
        (src / c).mkdir(parents=True)
        (src / c / "ok.png").write_bytes(png_bytes(np.full((8, 8), 10 + int(c[1]), np.uint8)))
    (src / "c1" / "loop").symlink_to("..")
    with no_hang(60):
        out = nsd(store, "ingest", src, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["added"]["labeled"] == 2
    reasons = dict(rows(store, "SELECT regexp_extract(source, '[^/]+$'), reason FROM rejects"))
    assert reasons == {"loop": "a directory, not an image file"}

    pq_dir = tmp_path / "pq"
    (pq_dir / "img").mkdir(parents=True)
    (pq_dir / "img" / "in.png").write_bytes(png_bytes(np.full((8, 8), 77, np.uint8)))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([
        {"bytes": None, "path": "img/in.png"}, {"bytes": None, "path": "img"},
        {"bytes": None, "path": "img/a\x00b.png"}], image)}), pq_dir / "t.parquet")
    out = nsd(store, "ingest", pq_dir / "t.parquet", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["added"]["unlabeled"] == 1 and json.loads(out.stdout)["rejected"] == 2
    reasons = [r for (r,) in rows(store, "SELECT reason FROM rejects WHERE source LIKE '%t.parquet%' ORDER BY 1")]
    assert reasons[0] == "a directory, not an image file" and "null byte" in reasons[1], reasons


def test_idx_header_sizes_are_checked_before_allocating(store, tmp_path):
    """A header claiming 100000 x 100000 images once ended in MemoryError."""
    import gzip

    src = tmp_path / "idx"
    src.mkdir()
    huge = struct.pack(">4B3I", 0, 0, 8, 3, 2, 100_000, 100_000) + bytes(64)
    (src / "a-images-idx3-ubyte").write_bytes(huge)
    with no_hang(30):
        one_line_error(nsd(store, "ingest", src / "a-images-idx3-ubyte"), 2, "claims 100000x100000 images")
    many = struct.pack(">4B3I", 0, 0, 8, 3, 4_000_000_000, 28, 28) + bytes(28 * 28)
    (src / "b-images-idx3-ubyte").write_bytes(many)
    one_line_error(nsd(store, "ingest", src / "b-images-idx3-ubyte"), 2, "more than the file holds")
    with gzip.open(src / "c-images-idx3-ubyte.gz", "wb") as f:  # a gzip's size is unknown: read in bounded chunks
        f.write(many)
    with no_hang(30):
        out = nsd(store, "ingest", src / "c-images-idx3-ubyte.gz")
    assert out.exit_code != 0 and "truncated" in out.output and "Traceback" not in out.output
    assert rows(store, "SELECT count(*) FROM images") == [(0,)]  # nothing half-ingested


@pytest.mark.parametrize("arch", ["local-dir:/tmp", "hf-hub:someone/model", "no_such_arch_xyz"])
def test_model_names_are_plain_timm_architectures(small, arch):
    """`local-dir:` was registered with its path as architecture; `hf-hub:` hung ~30 s."""
    with no_hang(120):  # importing torch and timm takes most of it on a busy machine
        one_line_error(nsd(small, "train", "--model", arch, "--name", "m", "--steps", "1"), 2,
                       "unknown timm architecture")
    assert rows(small, "SELECT count(*) FROM models") == [(0,)]


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    """`--data-path ./lake/` was stored as typed: a user in another directory wrote elsewhere."""
    from nsd.engine.store import Store

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert nsd("s", "init", data_path="./lake/").exit_code == 0
    monkeypatch.chdir(tmp_path / "b")
    store = Store(tmp_path / "a" / "s")
    assert store.data_path == str(tmp_path / "a" / "lake") + "/"
    add_images(store, {"labeled": 1}, num_classes=2)
    assert nsd(store, "show", "images").exit_code == 0 and not (tmp_path / "b" / "lake").exists()


def test_passwords_in_the_store_string_are_never_printed(tmp_path):
    uri = "postgres:dbname=nsd host=127.0.0.1 port=1 user=u password=hunter2"
    with no_hang(60):
        out = nsd(uri, "show", "images")
    assert out.exit_code != 0 and "password=***" in out.output and "hunter2" not in out.output
    out = nsd("postgresql://u:hunter2@127.0.0.1:1/nsd", "versions")
    assert out.exit_code != 0 and "hunter2" not in out.output


@pytest.mark.slow
def test_sql_json_streams_with_flat_memory(small):
    """`nsd sql "SELECT * FROM range(20000000)" --limit 0 --json` once reached 5.2 GB."""
    from helpers import nsd_argv

    def peak_kib(n: int) -> int:
        script = ("import resource, subprocess, sys; "
                  "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
                  "assert p.returncode == 0, p.stderr[-500:]; "
                  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        argv = nsd_argv(small, "sql", f"SELECT range AS i, 'row ' || range AS t FROM range({n})", "--limit", "0",
                        "--json")
        out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip())

    small_run, big_run = peak_kib(50_000), peak_kib(1_000_000)
    assert big_run - small_run < 80 * 1024, (small_run, big_run)  # 20x the rows, not 20x the memory
    out = nsd(small, "sql", "SELECT range AS i FROM range(5)", "--json", "--limit", "3")
    assert json.loads(out.stdout) == [{"i": 0}, {"i": 1}, {"i": 2}] and "first 3 rows" in out.stderr


def test_gc_never_deletes_outside_the_store_whatever_the_catalog_says(store, tmp_path):
    """An entry of ducklake_files_scheduled_for_deletion pointing elsewhere was deleted by gc."""
    import sqlite3

    add_images(store, {"labeled": 2}, num_classes=2)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.txt").write_text("mine")
    (victim / "c.txt").write_text("mine too")
    with sqlite3.connect(store.root / "catalog.sqlite") as con:
        con.executemany("INSERT INTO ducklake_files_scheduled_for_deletion VALUES (?, ?, ?, ?)",
                        [(9001, str(victim / "a.txt"), 0, "2000-01-01 00:00:00+00"),
                         (9002, "../../victim/c.txt", 1, "2000-01-01 00:00:00+00")])
    one_line_error(nsd(store, "gc", "--older-than", "0", "--delete"), 2, "outside this store's data path")
    assert (victim / "a.txt").read_text() == "mine" and (victim / "c.txt").read_text() == "mine too"


def test_a_copied_store_reads_its_own_weights(store, tmp_path):
    """Checkpoints were recorded as absolute paths: after `cp -a s1 s4`, s4's eval read s1's
    weights, and after moving s1 its models were lost."""
    import shutil

    add_images(store, {"labeled": 4, "test": 2}, num_classes=2)
    out = nsd(store, "train", "--model", "test_resnet", "--name", "m", "--steps", "2", "--batch-size", "4",
              "--workers", "0", "--no-progress")
    assert out.exit_code == 0, out.output
    assert rows(store, "SELECT checkpoint FROM models")[0][0].startswith("checkpoints/m/model-")
    moved = tmp_path / "moved"
    shutil.copytree(store.root, moved)
    shutil.rmtree(store.root)  # nothing of the original is left to read by mistake
    out = nsd(str(moved), "eval", "m", "--json")
    assert out.exit_code == 0, out.output
    assert 0 <= json.loads(out.stdout)["top1"] <= 1


def test_two_stores_never_share_a_data_path(tmp_path):
    """`nsd init` accepted a data path another store used; the first store's gc then deleted
    the second one's files as orphans."""
    lake = tmp_path / "lake"
    assert nsd(str(tmp_path / "s1"), "init", data_path=str(lake)).exit_code == 0
    one_line_error(nsd(str(tmp_path / "s2"), "init", data_path=str(lake)), 2, "belongs to another store")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.parquet").write_bytes(b"PAR1")
    one_line_error(nsd(str(tmp_path / "s3"), "init", data_path=str(mine)), 2, "already holds files of no nsd store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lake", "mine", "s1"]  # refused: nothing created
    assert (mine / "thesis.parquet").read_bytes() == b"PAR1"


def test_a_moved_data_path_opens_with_its_marker(tmp_path):
    """After `mv data data2` every command failed and `--data-path data2` was refused with
    DuckDB's OVERRIDE_DATA_PATH hint, no nsd option: two machines mounting one share at
    different paths could not share a store."""
    lake, moved, other = tmp_path / "lake", tmp_path / "elsewhere" / "lake", tmp_path / "other"
    s = str(tmp_path / "s")
    assert nsd(s, "init", data_path=str(lake)).exit_code == 0
    from nsd.engine.store import Store

    add_images(Store(s), {"labeled": 3}, num_classes=2)
    moved.parent.mkdir()
    lake.rename(moved)
    assert nsd(s, "show", "images").exit_code != 0  # the recorded path is gone
    out = nsd(s, "sql", "SELECT count(*) AS n FROM images", "--json", data_path=str(moved))
    assert out.exit_code == 0 and json.loads(out.stdout) == [{"n": 6}], out.output  # 3 per class
    add_images(Store(s, str(moved)), {"labeled": 2}, num_classes=2, seed=1)  # writes land there too
    assert len(list(moved.rglob("*.parquet"))) > len(list((tmp_path / "s").rglob("*.parquet")))
    out = nsd(s, "sql", "SELECT count(*) AS n FROM images", "--json", env={"NSD_DATA_PATH": str(moved)})
    assert out.exit_code == 0 and json.loads(out.stdout) == [{"n": 10}], out.output
    other.mkdir()
    one_line_error(nsd(s, "show", "images", data_path=str(other)), 2, "holds no nsd-store.json of this store")
    assert nsd(str(tmp_path / "s2"), "init", data_path=str(other)).exit_code == 0
    one_line_error(nsd(s, "show", "images", data_path=str(other)), 2, "holds no nsd-store.json of this store")


def test_gc_refuses_a_copy_that_shares_the_data_path(tmp_path):
    """A copied store directory whose data lives elsewhere writes to the same files: its gc
    would delete the original's new files as orphans. A moved store keeps working."""
    import shutil

    from nsd.engine.store import Store

    lake = tmp_path / "lake"
    original = Store(tmp_path / "s1", str(lake))
    original.init()
    add_images(original, {"labeled": 2}, num_classes=2)
    shutil.copytree(original.root, tmp_path / "copy")
    add_images(original, {"labeled": 2}, num_classes=2, seed=1)  # files the copy does not know
    files = sorted(p for p in lake.rglob("*.parquet"))
    one_line_error(nsd(str(tmp_path / "copy"), "gc", "--older-than", "0", "--delete"), 2, "is a copy of")
    assert sorted(p for p in lake.rglob("*.parquet")) == files
    shutil.rmtree(original.root)  # now the copy is the store that moved
    out = nsd(str(tmp_path / "copy"), "gc", "--older-than", "0", "--delete")
    assert out.exit_code == 0, out.output
    assert json.loads((lake / "nsd-store.json").read_text())["catalog"] == str(tmp_path / "copy")


def test_gc_of_a_store_without_marker_asks_for_init(store):
    """Stores made before markers existed: gc --delete waits until `nsd init` claims the path."""
    (store.root / "data" / "nsd-store.json").unlink()
    one_line_error(nsd(store, "gc", "--delete"), 2, "carries no owner marker")
    assert nsd(store, "gc").exit_code == 0  # listing deletes nothing: allowed
    assert nsd(store, "init").exit_code == 0
    assert nsd(store, "gc", "--delete").exit_code == 0
