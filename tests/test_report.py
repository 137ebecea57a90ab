"""nsd report: the HTML report of a small real loop, drawn by a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import CHROMIUM, Browser
from helpers import add_images, new_store, nsd, one_line_error, records, rows
from nsd.engine.loop import LoopConfig, loop, report as loop_report
from nsd.engine.report import BINS, THUMBS, report, thumbnail_uri

HOSTILE = '<b>bold</b> & "q" <script>alert(1)</script>'
PLOTS = {"accuracy", "selection-size", "lineage", "histogram", "reliability", "flip-matrix", "selection",
         "timeline", "splits"}


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """Two loop iterations of test_resnet on 4 synthetic classes (gold labels hidden in the
    pool), a supervised baseline, and a class name full of markup."""
    store = new_store(tmp_path_factory.mktemp("report") / "store", {"labeled": 12, "test": 8, "unlabeled": 24})
    store.write("test-rename", {}, lambda con: con.execute(
        "UPDATE classes SET name = ? WHERE class_id = 1", [HOSTILE]) and {"classes": 1})
    # A teacher that learns a little and students that barely train: confidences spread,
    # mistakes and flips, in about 30 s of CPU. A barely trained student may be under 0.3
    # everywhere; with 4 classes every confidence is above 0.25, so 0.2 keeps a selection.
    train_opts = dict(steps=4, batch_size=16, unlabeled_ratio=1, lr=1e-2, workers=0, progress=False)
    loop(store, LoopConfig(name="tl", models=("test_resnet",), iterations=2, train=train_opts, baseline=True,
                           teacher=dict(steps=25), label=dict(batch_size=64, progress=False),
                           balance=dict(threshold=0.2)), log=lambda msg: None)
    return store


@pytest.fixture(scope="module")
def page(looped, tmp_path_factory):
    """The loop's report opened in Chromium: (path, html, browser, session)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
    path = report(looped, tmp_path_factory.mktemp("out") / "report.html", loop="tl")
    browser = Browser()
    try:
        session = browser.open(path.as_uri())
        yield path, path.read_text(), browser, session
    finally:
        browser.close()


def js(page, expr):
    return page[2].evaluate(page[3], expr)


@pytest.mark.slow  # a real loop, drawn by a real browser
def test_page_makes_no_network_request(page):
    path, html, browser, session = page
    urls = browser.requests(session)
    assert urls[0] == path.as_uri()
    others = [u for u in urls[1:] if not u.startswith("data:image/png;base64,")]
    assert others == [], others
    assert len(urls) > 1  # the thumbnails were requested, as data: URLs
    # The policy itself: anything else the page might ask for is refused by the browser too.
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in html
    assert "<script" not in html.lower().replace("&lt;script", "")
    assert not re.search(r'(src|href)="(?!data:|#)', html)


@pytest.mark.slow
def test_plots_and_thumbnails_are_drawn(page, tmp_path):
    path, html, browser, session = page
    plots = js(page, """[...document.querySelectorAll('svg.plot')].map(s => {
        const r = s.getBoundingClientRect();
        return {kind: s.dataset.plot, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                shapes: s.querySelectorAll('rect,circle,polyline,line').length};
    })""")
    images = js(page, """[...document.querySelectorAll('img')].map(i => {
        const r = i.getBoundingClientRect();
        return {ok: i.complete && i.naturalWidth > 0, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
    })""")
    assert {p["kind"] for p in plots} >= PLOTS
    assert len(images) == html.count("<img ") and len(images) >= 4 * THUMBS
    assert all(i["ok"] for i in images), "a thumbnail did not decode"
    shot = Image.open(io.BytesIO(browser.screenshot(session))).convert("RGB")
    shot.save(tmp_path / "report.png")
    pixels = np.asarray(shot).astype(int)
    assert pixels.shape[1] > 1200 and pixels.shape[0] > 2000
    for p in plots:
        assert p["w"] > 50 and p["h"] > 50 and p["shapes"] > 3, p
        box = pixels[int(p["y"]):int(p["y"] + p["h"]), int(p["x"]):int(p["x"] + p["w"])]
        # Drawn: the plot's area holds coloured marks (bars, lines, dots), not just white and grey.
        coloured = (box.max(axis=2) - box.min(axis=2) > 60).sum()
        assert coloured >= 30, (p, coloured)
    for i in images:
        tile = pixels[int(i["y"]) + 2:int(i["y"] + i["h"]) - 2, int(i["x"]) + 2:int(i["x"] + i["w"]) - 2]
        assert tile.size and tile.std() > 10, i  # a picture (noise + bright square), not a blank tile


@pytest.mark.slow
def test_hostile_class_name_is_text(page):
    path, html, browser, session = page
    assert HOSTILE not in html and "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;q&quot;" in html
    assert js(page, "document.querySelectorAll('script').length") == 0
    assert js(page, "[...document.querySelectorAll('b')].some(b => b.textContent === 'bold')") is False
    assert HOSTILE in js(page, "document.body.innerText")
    # Only the elements the report writes exist: nothing came in through the data.
    tags = set(js(page, "[...new Set([...document.querySelectorAll('*')].map(n => n.tagName.toLowerCase()))]"))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "h4", "p", "nav",
                    "a", "main", "section", "div", "table", "thead", "tbody", "tr", "th", "td", "img", "b", "i",
                    "code", "span", "figure", "figcaption", "svg", "rect", "line", "text", "circle", "polyline",
                    "defs", "marker", "path"}, tags


def _gold_rows(store, run):
    return records(store, "SELECT p.confidence, p.predicted, i.gold_label FROM pseudo_labels p "
                          "JOIN images i USING (image_id) WHERE p.label_run = ?", [run])


def _label_runs(store):
    """The label runs of the loop's selections, in iteration order."""
    return [r["label_run"] for r in records(store, "SELECT selection, any_value(label_run) AS label_run "
                                                   "FROM selections GROUP BY 1 ORDER BY 1")]


@pytest.mark.slow
def test_numbers_on_the_page_match_the_store(page, looped):
    store = looped
    runs = _label_runs(store)
    assert len(runs) == 2
    for run in runs:
        # ECE, recomputed here from the raw rows with the same equal bins
        gold = _gold_rows(store, run)
        conf = np.array([r["confidence"] for r in gold], dtype=float)
        right = np.array([r["predicted"] == r["gold_label"] for r in gold])
        b = np.clip(np.floor(conf * BINS), 0, BINS - 1)
        ece = sum((b == k).sum() / len(b) * abs(right[b == k].mean() - conf[b == k].mean()) for k in np.unique(b))
        text = js(page, f"document.getElementById('run-{run}').innerText")
        assert f"ECE {100 * ece:.2f}%" in text
        assert f"{len(gold)} rows" in text
    # flips between the two runs, counted here image by image
    first = {iid: p for iid, p in _pairs(store, runs[0])}
    second = dict(_pairs(store, runs[1]))
    changed = sum(first[i] != second[i] for i in first if i in second)
    text = js(page, f"document.getElementById('run-{runs[1]}').innerText")
    assert f"{changed} of {len(first)} images changed class" in text
    # per selection: kept and duplicated per class add up to the selection's rows and copies
    with store.reader() as con:
        for sel in ("tl-sel1", "tl-sel2"):
            rows, copies = con.execute("SELECT count(*), sum(copies) FROM selections WHERE selection = ?",
                                       [sel]).fetchone()
            k = json.loads(con.execute("SELECT params FROM runs WHERE kind = 'balance' AND name = ?",
                                       [sel]).fetchone()[0])["per_class"]
            table = js(page, f"""[...document.querySelectorAll('#sel-{sel} table.stats tbody tr')]
                .map(tr => [...tr.cells].map(td => td.innerText))""")
            kept = sum(int(r[3].replace(",", "")) for r in table)
            dup = sum(int(r[4].replace(",", "")) for r in table)
            assert (kept, kept + dup) == (rows, copies)
            assert f"K = {k} images per class" in js(page, f"document.getElementById('sel-{sel}').innerText")
    # at a glance: the baseline and each iteration's test accuracy
    glance = js(page, "document.getElementById('glance').innerText")
    base = next(r for r in loop_report(store, "tl") if r["model"] == "tl-baseline")
    assert (f"Supervised baseline tl-baseline (labeled split only, {base['steps']} steps: compute-matched to the "
            f"loop): test accuracy {100 * base['test_acc']:.1f}%") in glance
    for name in ("tl-m0", "tl-m1", "tl-m2"):
        assert name in glance
    # every student below its teacher or the baseline is named as not progress, and only those
    flagged = [r for r in loop_report(store, "tl") if r["flag"]]
    for r in flagged:
        assert f"{r['model']} is {r['flag']}" in glance
    assert ("Not progress:" in glance) == bool(flagged)


def _pairs(store, run):
    return rows(store, "SELECT image_id, predicted FROM pseudo_labels WHERE label_run = ?", [run])


@pytest.mark.slow
def test_cli_scopes_and_errors(looped, tmp_path):
    store = looped
    out = nsd(store, "report", "-o", str(tmp_path / "a.html"))  # default: the newest loop
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == str(tmp_path / "a.html")
    assert "nsd report: loop tl" in (tmp_path / "a.html").read_text()
    run = _label_runs(store)[1]
    for args, title in ((["--model", "tl-m1"], "model tl-m1"), (["--labels", run], f"label run {run}"),
                        (["--labels", "tl-it2-label"], f"label run {run}")):
        out = nsd(store, "report", *args, "-o", str(tmp_path / "b.html"), "--thumbs", "2", "--bins", "5", "--force")
        assert out.exit_code == 0, out.output
        html = (tmp_path / "b.html").read_text()
        assert f"nsd report: {title}" in html and html.count("<img ") > 0
        if args[0] == "--labels":  # that run and the selection balanced from it, only
            assert html.count('<section id="run-') == 1 and f'id="run-{run}"' in html
            assert 'id="sel-tl-sel2"' in html and 'id="sel-tl-sel1"' not in html
    for args, message in (
            (["--loop", "nope"], "no loop 'nope'"), (["--loop", "tl", "--model", "tl-m1"], "at most one"),
            (["--model", "nope"], "unknown model"), (["--labels", "nope"], "neither a label run"),
            (["-o", str(tmp_path)], "is a directory"), (["-o", str(tmp_path / "no" / "r.html")], "does not exist"),
            (["--thumbs", "99"], "--thumbs"), (["--bins", "1"], "--bins"), (["--loop", "<x>"], "invalid loop name")):
        one_line_error(nsd(store, "report", *args), 2, message)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.slow
def test_output_paths_are_never_destroyed(looped, tmp_path):
    """-o once replaced the store's catalog, FIFOs, a link's target and devices with HTML."""
    store = looped
    catalog = store.root / "catalog.sqlite"
    before = catalog.read_bytes()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "link.html").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.html")
    existing = tmp_path / "old.html"
    existing.write_text("old")
    for out, message in ((catalog, "exists; pass --force"), (store.root / "new.html", "inside the store"),
                         (Path(store.data_path) / "r.html", "inside the store"),
                         (tmp_path / "link.html", "symbolic link"), (tmp_path / "fifo.html", "not a regular file"),
                         ("/dev/null", "not a regular file"), (existing, "exists; pass --force")):
        one_line_error(nsd(store, "report", "-o", str(out)), 2, message)
    one_line_error(nsd(store, "report", "-o", str(catalog), "--force"), 2, "inside the store")
    one_line_error(nsd(store, "report", "-o", str(tmp_path / "link.html"), "--force"), 2, "symbolic link")
    assert catalog.read_bytes() == before and target.read_text() == "keep me" and existing.read_text() == "old"
    assert not (store.root / "new.html").exists() and (tmp_path / "link.html").is_symlink()
    out = nsd(store, "report", "-o", str(existing), "--force")
    assert out.exit_code == 0, out.output
    assert "nsd report" in existing.read_text() and not list(tmp_path.glob(".*.tmp"))


def test_report_of_a_store_without_models(store, tmp_path):
    add_images(store, {"labeled": 2, "unlabeled": 3})
    path = report(store, tmp_path / "r.html")
    html = path.read_text()
    assert "No model or label run" in html and 'data-plot="splits"' in html and 'data-plot="timeline"' in html


def test_thumbnails_are_small_pngs_and_garbage_is_a_blank_tile():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    uri = thumbnail_uri(buf.getvalue())
    assert uri.startswith("data:image/png;base64,")
    import base64

    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(thumb.size) == 64 and thumb.size[0] > thumb.size[1]
    assert thumbnail_uri(b"not an image") is None and thumbnail_uri(b"") is None
    assert thumbnail_uri(Path(__file__).read_bytes()) is None
