"""`nsd report`: one self-contained HTML file about a loop, a model or a label run, and the store.

The page works offline and alone: charts are inline SVG (nsd.engine.svg), thumbnails are
``data:`` URIs, there is no JavaScript, and a Content-Security-Policy forbids any request that
is not a ``data:`` image. Every number comes from a query in schemas/ (``report_*.sql``,
``loop_report.sql``) or from the engine's own functions (lineage, the balance dry run, the
accuracy of ``nsd show pseudo_labels``, the label change of ``nsd diff``), all aggregated in
DuckDB; only thumbnails' bytes, a bounded number of them, come into Python.

Sections:
1. at a glance: test accuracy per iteration (and the ``<loop>-baseline`` model when there is
   one), pseudo-label accuracy, selection size; lineage as a diagram with snapshot numbers;
2. per label run: confidence histograms with the threshold, reliability and ECE against
   hidden gold labels, per-class accuracy, class flips against the previous label run;
3. per selection: candidates, kept, duplicated, dropped per class, and K;
4. thumbnail grids: most confident, least confident kept, confident mistakes, flipped;
5. the store: versions, table sizes, splits per class.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import os
import re
from pathlib import Path

from PIL import Image

from nsd.engine import svg
from nsd.engine.balance import BalanceParams, balance_sql, plan
from nsd.engine.dups import near_test_pairs
from nsd.engine.errors import UsageError
from nsd.engine.inspect import images_summary, label_accuracy, label_change, selections_summary, versions
from nsd.engine.lineage import lineage, snapshots_by_run
from nsd.engine.loop import report as loop_report
from nsd.engine.models import has_model, model_exists
from nsd.engine.runs import (balance_run, label_run_of, latest_label_run, previous_label_run, run_params,
                             selections_of)
from nsd.engine.paths import output_file, write_file
from nsd.engine.release import __version__
from nsd.engine.store import Store, check_name
from nsd.engine.svg import e
from nsd.schemas import read_sql

# Defaults and caps: a report stays a few MB whatever the store holds.
THUMBS = 8            # thumbnails per class in each grid
MAX_THUMBS = 32
BINS = 20             # confidence histogram bins
MAX_BINS = 100
MAX_CLASSES = 24      # classes drawn one by one (histograms, grids, flip matrix, splits)
MAX_TABLE_CLASSES = 100  # classes listed in per-class tables and selection bars
FLIPPED = 48          # thumbnails of images that changed class, per label run
THUMB_PX = 64         # thumbnails are at most this many pixels a side
MAX_THUMB_PIXELS = 50_000_000  # larger (or bomb) images are not decoded: a blank tile instead
NEAR_TEST_PAIRS = 24  # pairs the leakage gate left out, shown per selection
VERSIONS_LISTED = 30  # newest snapshots listed in the store section (the timeline shows all)
MAX_TIMELINE = 2000
DEFAULT_THRESHOLD = BalanceParams.threshold  # drawn on label runs no selection in scope used

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def report(store: Store, out: str | os.PathLike = "report.html", *, loop: str | None = None,
           model: str | None = None, labels: str | None = None, thumbs: int = THUMBS, bins: int = BINS,
           force: bool = False) -> Path:
    """Write the HTML report to OUT (atomically) and return its path. OUT must not exist (or,
    with ``force``, be a regular file), be a link, or lie inside the store (paths.output_file).

    Scope: one of ``loop`` (a loop name: models ``<loop>-m<i>``), ``model`` (a model and its
    lineage) or ``labels`` (a label run id, or a version/tag: its newest label run). With none,
    the newest loop in the store, else the newest model, else the newest label run.

    Example::

        report(Store("nsd-store"), "fmnist.html", loop="fmnist")
    """
    if sum(x is not None for x in (loop, model, labels)) > 1:
        raise UsageError("give at most one of --loop, --model, --labels")
    if isinstance(thumbs, bool) or not isinstance(thumbs, int) or not 0 <= thumbs <= MAX_THUMBS:
        raise UsageError(f"--thumbs must be an integer in [0, {MAX_THUMBS}], got {thumbs!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise UsageError(f"--bins must be an integer in [2, {MAX_BINS}], got {bins!r}")
    path = output_file(out, force=force, protect=store.own_dirs())
    store.require()
    snap = store.resolve(None)
    scope = _scope(store, loop, model, labels)
    with store.reader(snap) as con:
        names = dict(con.execute("SELECT class_id, name FROM classes ORDER BY class_id").fetchall())
        ctx = {"store": store, "con": con, "names": names, "snap": snap, "thumbs": thumbs, "bins": bins}
        _fill_label_accuracy(ctx, scope["rows"])
        body = [_glance(ctx, scope)]
        body += [_label_run_section(ctx, scope, run) for run in scope["label_runs"]]
        body += [_selection_section(ctx, sel) for sel in scope["selections"]]
        body.append(_store_section(ctx))
    write_file(path, _page(scope, store, snap, body).encode("utf-8"))
    return path


# --------------------------------------------------------------------------- scope


def _scope(store: Store, loop: str | None, model: str | None, labels: str | None) -> dict:
    """What the report covers: title, glance rows, lineage chain, label runs and selections."""

    if loop is None and model is None and labels is None:
        loop, model, labels = _default_scope(store)
    scope = {"title": "store", "rows": [], "chain": [], "label_runs": [], "selections": [], "baseline": None}
    if loop is not None:
        check_name(loop, "loop name")
        rows = loop_report(store, loop)  # the iterations, then the baseline (iteration NULL) if any
        its = [r for r in rows if r["iteration"] is not None]
        if not its:
            raise UsageError(f"no loop {loop!r} in this store (no model {loop}-m0)")
        scope.update(title=f"loop {loop}", rows=its, chain=lineage(store, its[-1]["model"]),
                     baseline=next((r for r in rows if r["iteration"] is None), None))
    elif model is not None:
        chain = lineage(store, model)
        scope.update(title=f"model {model}", chain=chain, rows=_rows_from_chain(store, chain))
    elif labels is not None:
        run, teacher = _find_label_run(store, labels)
        chain = [{"kind": "label_run", "name": run, "snapshot": _run_snapshot(store, run), "teacher": teacher}]
        if teacher and model_exists(store, teacher):
            chain += lineage(store, teacher)
        scope.update(title=f"label run {run}", chain=chain)
    runs = [link for link in reversed(scope["chain"]) if link["kind"] == "label_run"]  # oldest first
    for i, link in enumerate(runs):
        scope["label_runs"].append({"run": link["name"], "snapshot": link.get("snapshot"),
                                    "teacher": link.get("teacher"),
                                    "previous": runs[i - 1]["name"] if i else _previous_run(store, link["name"])})
    sels = [link["name"] for link in reversed(scope["chain"]) if link["kind"] == "selection"]
    if labels is not None:  # that run alone (its teacher's history is in the lineage diagram)
        scope["label_runs"] = scope["label_runs"][-1:]
        sels = _selections_of(store, scope["label_runs"][0]["run"])
    if sels:

        snap_of = snapshots_by_run(store)
        scope["selections"] = [_balance_run(store, s, snap_of) for s in sels]
    thresholds = {s["label_run"]: s["params"].get("threshold") for s in scope["selections"]}
    for run in scope["label_runs"]:
        run["threshold"] = thresholds.get(run["run"])
    return scope


def _default_scope(store: Store) -> tuple:
    """(loop, model, labels): the loop tagged last, else the newest model, else the newest label run."""
    with store.reader() as con:
        for (tag,) in con.execute("SELECT tag FROM tags WHERE suffix(tag, '-images') "
                                  "ORDER BY created_at DESC, tag").fetchall():
            name = tag[: -len("-images")]
            if has_model(con, f"{name}-m0"):
                return name, None, None
        row = con.execute("SELECT model FROM models ORDER BY created_at DESC, model LIMIT 1").fetchone()
        if row:
            return None, row[0], None
        return None, None, latest_label_run(con)


def _rows_from_chain(store: Store, chain: list[dict]) -> list[dict]:
    """Glance rows (as loop_report.sql's) for a model's lineage: one per model, oldest first."""
    rows, sel, run = [], None, None
    for link in reversed(chain):
        if link["kind"] == "selection":
            sel = link
        elif link["kind"] == "label_run":
            run = link
        elif link["kind"] == "model" and link.get("note") is None:
            rows.append({"iteration": len(rows), "model": link["name"], "arch": link.get("arch"),
                         "params": link.get("num_params"), "selection": sel["name"] if sel else None,
                         "selection_images": sel["rows"] if sel else None,
                         "selection_size": sel["copies"] if sel else None,
                         "pseudo_label_acc": None, "selected_acc": None, "test_acc": link.get("test_acc"),
                         "label_run": run["name"] if run else None})
            sel = run = None
    return rows


def _fill_label_accuracy(ctx, rows: list[dict]) -> None:
    """Pseudo-label accuracy of glance rows built from a lineage (as `nsd show pseudo_labels`)."""

    for r in rows:
        if r.get("label_run") and r["pseudo_label_acc"] is None:
            acc = label_accuracy(ctx["con"], r["label_run"], ctx["names"])
            r["pseudo_label_acc"] = acc["accuracy"] if acc else None


def _find_label_run(store: Store, ref: str) -> tuple[str, str | None]:
    """A label run id, or a version/tag whose newest label run is meant; with its teacher."""
    with store.reader() as con:
        row = con.execute("SELECT label_run, any_value(teacher) FROM pseudo_labels WHERE label_run = ? "
                          "GROUP BY label_run", [str(ref)]).fetchone()
        if row:
            return row[0], row[1]
        try:
            snap = store.resolve(ref, con)
        except UsageError:
            raise UsageError(f"--labels {ref!r} is neither a label run nor a version or tag") from None
        run = latest_label_run(con, snap)
        if run is None:
            raise UsageError(f"no pseudo labels at version {snap}")
        teacher = con.execute("SELECT any_value(teacher) FROM pseudo_labels WHERE label_run = ?", [run]).fetchone()
    return run, teacher[0]


def _run_snapshot(store: Store, run_id: str) -> int | None:

    return snapshots_by_run(store).get(run_id)


def _previous_run(store: Store, run: str) -> str | None:
    """The label run finished last before RUN (for flips when the chain has none before it)."""
    with store.reader() as con:
        return previous_label_run(con, run)


def _selections_of(store: Store, run: str) -> list[str]:
    with store.reader() as con:
        return selections_of(con, run)


def _balance_run(store: Store, selection: str, snap_of: dict) -> dict:
    """The selection's balance run: parameters (K, threshold, ...) and versions it read."""
    with store.reader() as con:
        run = balance_run(con, selection) or {"run_id": None, "params": {}, "reads": {}}
        label_run = label_run_of(con, selection)
    return {"selection": selection, "label_run": run["params"].get("label_run") or label_run,
            "params": run["params"], "reads": run["reads"], "snapshot": snap_of.get(run["run_id"])}



# --------------------------------------------------------------------------- 1. at a glance


def _glance(ctx, scope) -> str:
    rows, chain, base = scope["rows"], scope["chain"], scope["baseline"]
    html = ['<section id="glance"><h2>At a glance</h2>']
    if rows:
        its = [r["iteration"] for r in rows]
        acc_series = [("test accuracy", svg.BLUE, [r["test_acc"] for r in rows], False),
                      ("pseudo-label accuracy", svg.ORANGE, [r["pseudo_label_acc"] for r in rows], False)]
        if base and base["test_acc"] is not None:
            acc_series.append((f"baseline {base['model']}", svg.GREY, [base["test_acc"]] * len(rows), True))
        html.append('<div class="row">')
        html.append(svg.line_chart(its, acc_series, "accuracy per iteration", kind="accuracy"))
        html.append(svg.stacked_bars(
            [str(i) for i in its],
            [("distinct images", svg.GREEN, [r["selection_images"] or 0 for r in rows]),
             ("extra copies", svg.TEAL, [(r["selection_size"] or 0) - (r["selection_images"] or 0) for r in rows])],
            "selection size per iteration", kind="selection-size", width=420))
        html.append("</div>")
        html.append(_table(
            ["iteration", "model", "arch", "params", "steps", "selection", "images", "size", "pseudo-label acc",
             "selected acc", "test acc", "vs teacher", "vs baseline", "flag"],
            [[r["iteration"], r["model"], r["arch"], r["params"], r.get("steps"), r["selection"], r["selection_images"],
              r["selection_size"], _pct(r["pseudo_label_acc"]), _pct(r["selected_acc"]), _pct(r["test_acc"]),
              _points(r.get("vs_teacher")), _points(r.get("vs_baseline")), r.get("flag") or ""]
             for r in rows]))
        if base:
            html.append(f'<p>Supervised baseline <b>{e(base["model"])}</b> (labeled split only, '
                        f'{e(str(base.get("steps")))} steps: compute-matched to the loop): '
                        f'test accuracy {e(_pct(base["test_acc"]))}.</p>')
        flagged = [r for r in rows if r.get("flag")]
        if flagged:
            html.append('<p class="warn">Not progress: ' + "; ".join(
                f'<b>{e(r["model"])}</b> is {e(r["flag"])}' for r in flagged) + ".</p>")
    if chain:
        html.append("<h3>Lineage</h3><p>Each box was made from the one on its right; numbers are the "
                    "snapshots that committed them (replay with <code>AT (VERSION =&gt; n)</code>).</p>")
        html.append(f'<div class="scroll">{svg.diagram([_node(link) for link in chain], "lineage")}</div>')
    if not rows and not chain:
        html.append("<p>No model or label run in this store yet: only the store overview below.</p>")
    html.append("</section>")
    return "".join(html)


def _points(d) -> str:
    return "-" if d is None else f"{100 * d:+.2f}"


def _node(link: dict) -> tuple[str, str, list[str]]:
    snap = f"snapshot {link['snapshot']}" if link.get("snapshot") is not None else "snapshot ?"
    kind = link["kind"]
    if kind == "model":
        acc = link.get("test_acc")
        return "model", link["name"], [snap] + ([f"test {100 * acc:.1f}%"] if acc is not None else [])
    if kind == "selection":
        return "selection", link["name"], [snap, f"{link.get('copies') or 0:,} rows"]
    if kind == "label_run":
        rows = link.get("rows")
        return "label run", link["name"], [snap] + ([f"{rows:,} rows"] if rows is not None else [])
    if kind == "external_teacher":
        return "external teacher", link["name"], ["imported soft labels"]
    return "labeled data", "labeled split", [snap, f"{link.get('rows') or 0:,} images"]


# --------------------------------------------------------------------------- 2. label runs


def _label_run_section(ctx, scope, run: dict) -> str:

    con, names, bins, rid = ctx["con"], ctx["names"], ctx["bins"], run["run"]
    hist = con.execute(read_sql("report_confidence"), {"label_run": rid, "bins": bins}).fetchall()
    classes = _classes(names, {c for c, _, _ in hist})
    per_class: dict = {}
    for c, b, n in hist:
        per_class.setdefault(c, [0] * bins)[b] += n
    overall = [sum(v[i] for v in per_class.values()) for i in range(bins)]
    thr = run["threshold"] if run["threshold"] is not None else DEFAULT_THRESHOLD
    thr_note = "" if run["threshold"] is not None else " (balance's default: no selection in this report used the run)"
    html = [f'<section id="{_anchor("run", rid)}"><h2>Label run {e(rid)}</h2>',
            f'<p>Teacher <b>{e(run["teacher"])}</b>, snapshot {e(run["snapshot"])}, {sum(overall):,} rows. '
            f'Red line: the confidence threshold {thr:g}{e(thr_note)}.</p><div class="row">',
            svg.histogram(overall, "all classes", thr, width=420, height=200)]
    cal = run_params(con, rid).get("calibration")
    for undo in ([cal["temperature"]] if isinstance(cal, dict) else []) + [None]:
        rel = _reliability(con, rid, bins, undo)
        if rel:
            total = sum(r["rows"] for r in rel)
            ece = sum(r["rows"] / total * abs(r["accuracy"] - r["confidence"]) for r in rel)
            what = "before calibration (T = 1)" if undo else "as labeled" + (f" (T = {cal['temperature']:g})" if cal else "")
            html.append(f'<figure>{svg.reliability(rel, bins, "reliability " + what)}<figcaption>Reliability '
                        f'{e(what)} against {total:,} hidden gold labels: bars accuracy, red marks mean '
                        f'confidence. <b>ECE {100 * ece:.2f}%</b></figcaption></figure>')
    if isinstance(cal, dict):
        html.append(f'<p>Calibrated: T = {e(cal.get("temperature"))} fitted on {e(cal.get("images"))} images of the '
                    f'{e(cal.get("split"))} split (ECE there {e(cal.get("ece_before"))} -> {e(cal.get("ece_after"))}, '
                    f'NLL {e(cal.get("nll_before"))} -> {e(cal.get("nll_after"))}).</p>')
    html.append('</div><h3>Confidence per predicted class</h3><div class="grid">')
    for c in classes["shown"]:
        html.append(svg.histogram(per_class.get(c, [0] * bins), _cname(names, c), thr))
    html.append("</div>" + _more(classes))
    acc = label_accuracy(con, rid, names)
    if acc:
        html.append(f"<h3>Pseudo-label accuracy per class: {100 * acc['accuracy']:.1f}% of {acc['rows']:,}</h3>")
        html.append(_table(["class", "predicted", "precision", "gold", "recall"],
                           [[_cname(names, r["class_id"]), r["predicted"], _bar(r["precision"]), r["gold"],
                             _bar(r["recall"])] for r in acc["per_class"][:MAX_TABLE_CLASSES]], raw={2, 4}))
        html.append(_cut(len(acc["per_class"])))
    if run["previous"]:
        html.append(_flips(ctx, run["previous"], rid, label_change(con, run["previous"], rid, ctx["snap"], names)))
    html.append(_grids(ctx, rid, None, classes["shown"]))
    html.append("</section>")
    return "".join(html)


def _reliability(con, run: str, bins: int, undo_temperature: float | None) -> list[dict]:
    rows = con.execute(read_sql("report_reliability"),
                       {"label_run": run, "bins": bins, "undo_temperature": undo_temperature}).fetchall()
    return [dict(zip(("bin", "rows", "confidence", "accuracy"), r)) for r in rows]


def _flips(ctx, run_a: str, run_b: str, change: dict) -> str:
    con, names = ctx["con"], ctx["names"]
    rows = con.execute(read_sql("report_flips"), {"run_a": run_a, "run_b": run_b}).fetchall()
    classes = _classes(names, {a for a, _, _ in rows} | {b for _, b, _ in rows})
    index = {c: i for i, c in enumerate(classes["shown"])}
    matrix = [[0] * len(index) for _ in index]
    for a, b, n in rows:
        if a in index and b in index:
            matrix[index[a]][index[b]] += n
    html = [f"<h3>Class flips from {e(run_a)}</h3>",
            f"<p>{change['changed_class']:,} of {change['common_images']:,} images changed class."]
    if "with_truth" in change:
        html.append(f" Against {change['with_truth']:,} gold labels: {change['fixed']:,} fixed, "
                    f"{change['broken']:,} broken (accuracy {100 * change['accuracy_a']:.1f}% → "
                    f"{100 * change['accuracy_b']:.1f}%).")
    html.append("</p>")
    labels = [_cname(names, c) for c in classes["shown"]]
    html.append(f'<div class="scroll">{svg.heatmap(labels, matrix, "class flips", "previous run", "this run")}</div>')
    html.append(_more(classes))
    picked = con.execute(read_sql("report_flipped"), {"run_a": run_a, "run_b": run_b, "limit": FLIPPED}).fetchall()
    if picked:
        html.append(f"<h4>Images that flipped (most confident first, at most {FLIPPED})</h4><div class=\"thumbs\">")
        for iid, a, b, conf, gold, data, source in picked:
            cap = f"{_cname(names, a)} → {_cname(names, b)}"
            html.append(_thumb(data, cap, f"{cap} · confidence {_num(conf)} · gold {_cname(names, gold)} · {source}"))
        html.append("</div>")
    return "".join(html)


def _grids(ctx, run: str, selection: str | None, classes: list) -> str:
    """Per class thumbnail rows: the most confident, and where gold labels exist, confident mistakes."""
    html = []
    grids = [("confident", "Most confident per class")]
    if ctx["con"].execute("SELECT 1 FROM images WHERE gold_label IS NOT NULL LIMIT 1").fetchone():
        grids.append(("mistakes", "Confident mistakes per class (gold label differs)"))
    for grid, title in grids:
        html.append(_grid(ctx, grid, title, run, selection, classes))
    return "".join(html)


def _grid(ctx, grid: str, title: str, run: str | None, selection: str | None, classes: list) -> str:
    con, names = ctx["con"], ctx["names"]
    if not ctx["thumbs"] or not classes:
        return ""
    rows = con.execute(read_sql("report_thumbs"), {
        "grid": grid, "label_run": run, "selection": selection, "classes": [c for c in classes if c is not None],
        "per_class": ctx["thumbs"]}).fetchall()
    by_class: dict = {}
    for iid, c, conf, gold, data, source in rows:
        by_class.setdefault(c, []).append((conf, gold, data, source))
    html = [f'<h3>{e(title)}</h3><table class="thumbgrid" data-grid="{e(grid)}">']
    for c in classes:
        tiles = []
        for conf, gold, data, source in by_class.get(c, []):
            extra = f" · gold {_cname(names, gold)}" if gold is not None else ""
            caption = _num(conf) + (f" gold {gold}" if gold is not None else "")
            tiles.append(_thumb(data, caption, f"{_cname(names, c)} · confidence {_num(conf)}{extra} · {source}"))
        html.append(f'<tr><th>{e(_cname(names, c))}</th><td><div class="thumbs">'
                    f'{"".join(tiles) or "<i>none</i>"}</div></td></tr>')
    html.append("</table>")
    return "".join(html)


# --------------------------------------------------------------------------- 3. selections


def _selection_section(ctx, sel: dict) -> str:
    con, names, p = ctx["con"], ctx["names"], sel["params"]
    name = sel["selection"]
    stats, note = None, ""
    builtin = p.get("sql_sha256") == hashlib.sha256(balance_sql().encode()).hexdigest()
    if builtin and p.get("per_class") is not None:
        try:  # the balance dry run with the recorded parameters, at the version it read
            stats = plan(ctx["store"], labels=sel["reads"].get("pseudo_labels"), run=sel["label_run"],
                         threshold=p.get("threshold", DEFAULT_THRESHOLD), per_class=p["per_class"],
                         duplicate=p.get("duplicate", True), hard=p.get("hard", False), sharpen=p.get("sharpen"),
                         leakage_distance=p.get("leakage_distance"))
        except UsageError as exc:
            note = f"(the dry run failed: {exc}) "
    else:
        note = "(a query of your own chose the rows: candidates and drops are unknown) "
    k = p.get("per_class")
    how = "the median of the per-class candidates above the threshold" if p.get("per_class_default") else "given"
    html = [f'<section id="{_anchor("sel", name)}"><h2>Selection {e(name)}</h2>',
            f"<p>From label run <b>{e(sel['label_run'])}</b> (read at snapshot {e(sel['reads'].get('pseudo_labels'))}), "
            f"committed in snapshot {e(sel['snapshot'])}. <b>K = {e(k)}</b> images per class ({e(how)}); "
            f"threshold confidence &gt; {e(p.get('threshold'))}; duplicate {e(p.get('duplicate'))}, "
            f"hard {e(p.get('hard'))}, sharpen {e(p.get('sharpen') or 'none')}. {e(note)}</p>"]
    if stats:
        rows = [r for r in stats["classes"]]
        series = [("kept", svg.GREEN, [r["kept"] for r in rows]),
                  ("duplicated", svg.TEAL, [r["copies_added"] for r in rows]),
                  ("dropped over K", svg.RED, [r["dropped"] for r in rows]),
                  ("below threshold", svg.GREY, [r["candidates"] - r["after_threshold"] for r in rows])]
        labels = [_cname(names, r["class"]) for r in rows]
        table = [[_cname(names, r["class"]), r["candidates"], r["after_threshold"], r["kept"], r["copies_added"],
                  r["dropped"], r["total"]] for r in rows]
        cols = ["class", "candidates", "above threshold", "kept", "duplicated", "dropped", "rows in training"]
    else:
        found = next((s for s in selections_summary(con, names)["selections"] if s["selection"] == name), None)
        rows = found["by_class"] if found else []
        series = [("kept", svg.GREEN, [r["rows"] for r in rows]),
                  ("duplicated", svg.TEAL, [r["copies"] - r["rows"] for r in rows])]
        labels = [_cname(names, r["class_id"]) for r in rows]
        table = [[_cname(names, r["class_id"]), r["rows"], r["copies"] - r["rows"], r["copies"]] for r in rows]
        cols = ["class", "kept", "duplicated", "rows in training"]
    n = len(labels)
    labels, table = labels[:MAX_TABLE_CLASSES], table[:MAX_TABLE_CLASSES]
    series = [(s, c, v[:MAX_TABLE_CLASSES]) for s, c, v in series]
    html.append(svg.stacked_bars(labels, series, f"selection {name} per class", kind="selection",
                                 hline=("K", k) if isinstance(k, (int, float)) else None, width=720))
    html.append(_table(cols, table) + _cut(n))
    shown = _classes(names, {r[0] for r in con.execute(
        "SELECT DISTINCT predicted FROM selections WHERE selection = ?", [name]).fetchall()})
    html.append(_grid(ctx, "least_kept", "Least confident kept per class", sel["label_run"], name, shown["shown"]))
    html.append(_left_out_near_test(ctx, sel))
    html.append("</section>")
    return "".join(html)


def _left_out_near_test(ctx, sel: dict) -> str:
    """The leakage gate's pairs: each pool image left out beside the test image it is near."""
    distance, snap = sel["params"].get("leakage_distance"), sel["reads"].get("pseudo_labels")
    if distance is None or snap is None:
        return "<p>No leakage gate: near-copies of test images were not looked for.</p>"
    total, pairs = near_test_pairs(ctx["store"], snap, distance, sel["label_run"], limit=NEAR_TEST_PAIRS)
    html = [f"<h3>Left out as near-copies of test images ({total:,}, perceptual hash within {e(distance)} bits)</h3>"]
    if pairs:
        html.append(f"<p>Pool image, then the test image it is near (nearest first, at most {NEAR_TEST_PAIRS}).</p>"
                    '<div class="thumbs">')
        for p in pairs:
            html.append(_thumb(p["bytes"], f"pool, d={p['distance']}", p["image_id"]))
            html.append(_thumb(p["test_bytes"], f"test: {_cname(ctx['names'], p['test_label'])}", p["test_image"]))
        html.append("</div>")
    return "".join(html)


# --------------------------------------------------------------------------- 5. store


def _store_section(ctx) -> str:

    con, names = ctx["con"], ctx["names"]
    vers = versions(ctx["store"])
    html = ['<section id="store"><h2>The store</h2>', f"<h3>Versions ({len(vers):,} snapshots)</h3>",
            '<div class="scroll">', svg.timeline([(v["snapshot_id"], v["command"] or "other", _version_label(v))
                                                  for v in vers[-MAX_TIMELINE:]], "versions"), "</div>",
            _table(["snapshot", "time", "author", "message", "changes", "tags"],
                   [[v["snapshot_id"], (v["time"] or "")[:19], v["author"], v["message"], v["summary"],
                     ", ".join(v["tags"])] for v in reversed(vers[-VERSIONS_LISTED:])])]
    if len(vers) > VERSIONS_LISTED:
        html.append(f"<p>The newest {VERSIONS_LISTED} of {len(vers):,}; <code>nsd versions</code> lists all.</p>")
    html.append("<h3>Tables</h3>")
    html.append(_table(["table", "rows", "data files", "bytes"], con.execute(read_sql("report_tables")).fetchall()))
    imgs = images_summary(con, names)
    splits = [r["split"] for r in imgs["by_split"]]
    counts: dict = {}
    for r in imgs["by_class"]:
        counts.setdefault(r["class_id"], {})[r["split"]] = r["rows"]
    cls = _classes(names, set(counts))
    shown = cls["shown"] + ([None] if None in counts and None not in cls["shown"] else [])
    colors = {"labeled": svg.BLUE, "unlabeled": svg.GREY, "test": svg.ORANGE, "val": svg.TEAL}
    html.append("<h3>Images per class and split</h3>")
    html.append(svg.stacked_bars(
        [_cname(names, c) if c is not None else "(no label)" for c in shown],
        [(sp, colors.get(sp, svg.SERIES[i % len(svg.SERIES)]), [counts.get(c, {}).get(sp, 0) for c in shown])
         for i, sp in enumerate(splits)], "images per class and split", kind="splits", width=720))
    html.append(_more(cls))
    html.append("</section>")
    return "".join(html)


def _version_label(v: dict) -> str:
    tags = f" [{', '.join(v['tags'])}]" if v["tags"] else ""
    return f"{v['message'] or ''}{tags} {v['summary'] or ''}"


# --------------------------------------------------------------------------- HTML pieces


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;margin:0;background:#f4f5f7}
header{background:#1f2d3d;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8d3df}nav{padding:6px 24px;background:#e6e9ee;font-size:13px}
nav a{margin-right:14px;color:#1f4e79}main{padding:0 24px 40px}
.warn{color:#a61b1b;font-weight:600}
section{background:#fff;margin:18px 0;padding:8px 18px 16px;border-radius:6px;box-shadow:0 1px 2px #0002}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
h4{font-size:14px;margin:12px 0 4px}table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{border-bottom:1px solid #eee;padding:3px 8px;text-align:right;vertical-align:middle}
th{background:#fafafa}td:first-child,th:first-child{text-align:left}.row,.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:12px;max-width:300px}.scroll{overflow-x:auto}
.thumbs{display:flex;flex-wrap:wrap;gap:4px}.tile{width:72px;text-align:center;font-size:10px;overflow:hidden}
.tile img{width:64px;height:64px;image-rendering:pixelated;object-fit:contain;background:#000;display:block;margin:auto}
.tile .blank{width:64px;height:64px;background:#ccc;margin:auto}
.thumbgrid td{text-align:left}.bar{display:inline-block;height:10px;background:#4e79a7;vertical-align:middle}
code{background:#f0f0f0;padding:0 3px}
"""


def _page(scope: dict, store: Store, snap: int, body: list[str]) -> str:

    where = store.name
    nav = ['<a href="#glance">at a glance</a>']
    nav += [f'<a href="#{_anchor("run", r["run"])}">label run {e(r["run"])}</a>' for r in scope["label_runs"]]
    nav += [f'<a href="#{_anchor("sel", s["selection"])}">selection {e(s["selection"])}</a>' for s in scope["selections"]]
    nav.append('<a href="#store">store</a>')
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>nsd report: {e(scope['title'])}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>nsd report: {e(scope['title'])}</h1><p>store {e(where)} at snapshot {snap} · "
            f"generated {now} by nsd {e(__version__)}</p></header><nav>{''.join(nav)}</nav>"
            f"<main>{''.join(body)}</main></body></html>\n")


def _table(columns: list[str], rows: list, raw: set[int] = frozenset(), cls: str = "stats") -> str:
    """An HTML table; every cell is escaped except the columns in RAW (built here, already HTML)."""
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{v if i in raw else e(_cell(v))}</td>" for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _pct(v) -> str | None:
    return None if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _bar(v) -> str:
    if v is None:
        return "-"
    return f'<span class="bar" style="width:{80 * v:.0f}px"></span> {100 * v:.1f}%'


def _cname(names: dict, c) -> str:
    if c is None:
        return "(none)"
    return f"{c} {names[c]}" if c in names else str(c)


def _classes(names: dict, present: set) -> dict:
    """The classes drawn one by one (at most MAX_CLASSES, by id) and how many are left out."""
    every = sorted({c for c in present if c is not None} | set(names), key=int)
    return {"shown": every[:MAX_CLASSES], "hidden": max(len(every) - MAX_CLASSES, 0)}


def _more(classes: dict) -> str:
    n = classes["hidden"]
    return f"<p><i>{n:,} more classes not drawn (the first {MAX_CLASSES} by id are).</i></p>" if n else ""


def _cut(n: int) -> str:
    return f"<p><i>The first {MAX_TABLE_CLASSES} of {n:,} classes.</i></p>" if n > MAX_TABLE_CLASSES else ""


def _anchor(prefix: str, name: str) -> str:
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_-]", "_", str(name))


def _thumb(data, caption: str, title: str) -> str:
    uri = thumbnail_uri(data)
    img = f'<img src="{uri}" alt="{e(caption)}">' if uri else '<div class="blank"></div>'
    return f'<div class="tile" title="{e(title)}">{img}{e(caption)}</div>'


def thumbnail_uri(data) -> str | None:
    """A PNG data URI of the image scaled to at most THUMB_PX a side, or None if it does not decode."""

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.width * im.height > MAX_THUMB_PIXELS:
                return None
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced scale
            im.thumbnail((THUMB_PX, THUMB_PX))
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except Exception:  # any undecodable or hostile bytes: a blank tile, not a failed report
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


