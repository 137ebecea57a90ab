"""Trace a model back to its labeled data: model -> selection -> label run -> teacher -> ...

Each link names the snapshot that created it, read from the lineage recorded in the commit
(``run_id`` in the snapshot's extra info), so the chain can be replayed with ``AT (VERSION)``.
"""

from __future__ import annotations

import json

from nsd.engine.errors import UsageError
from nsd.engine.external import EXTERNAL, is_external
from nsd.engine.models import model_metrics
from nsd.engine.runs import balance_run
from nsd.engine.store import Store, name_literal


def snapshots_by_run(store: Store) -> dict[str, int]:
    """run_id -> snapshot that committed it (from the lineage in each commit)."""
    return {s["lineage"]["run_id"]: s["snapshot_id"] for s in store.snapshots() if s["lineage"].get("run_id")}


def lineage(store: Store, model: str, max_depth: int = 50) -> list[dict]:
    """The chain of a model, newest first, as a list of links.

    Each link is ``{"kind", "name", "snapshot", ...details}`` with kind in model, selection,
    label_run and labeled_data. Stops at the model that was trained on labels only.
    """
    store.require()
    snap_of = snapshots_by_run(store)
    chain: list[dict] = []
    seen: set[str] = set()
    with store.reader() as con:
        name = model
        while name and len(chain) < max_depth:
            if name in seen:  # a cycle can only come from hand-edited tables; do not loop forever
                break
            seen.add(name)
            row = con.execute(
                "SELECT model, run_id, arch, num_params, selection, selection_version, images_version, "
                "teacher, metrics, sha256 FROM models WHERE model = ? ORDER BY created_at LIMIT 1", [name]
            ).fetchone()
            if row is None:
                if not chain:
                    raise UsageError(f"unknown model {name!r}")
                chain.append({"kind": "model", "name": name, "snapshot": None, "note": "not in this store"})
                break
            (mname, run_id, arch, nparams, selection, sel_version, img_version, teacher, metrics, sha) = row
            metrics = json.loads(metrics) if isinstance(metrics, str) else (metrics or {})
            chain.append({
                "kind": "model", "name": mname, "snapshot": snap_of.get(run_id), "run_id": run_id,
                "arch": arch, "num_params": nparams, "sha256": sha,
                "test_acc": _test_acc(con, mname, metrics),
            })
            if not selection:
                chain.append({"kind": "labeled_data", "name": "images (labeled split)", "snapshot": img_version,
                              "rows": _labeled_rows(con, img_version)})
                break
            sel = con.execute(
                "SELECT any_value(label_run), count(*), sum(copies) FROM selections "
                f"WHERE selection = {name_literal(selection, 'selection')}").fetchone()
            label_run = sel[0]
            sel_run = balance_run(con, selection)
            chain.append({"kind": "selection", "name": selection,
                          "snapshot": snap_of.get(sel_run["run_id"]) if sel_run else sel_version,
                          "rows": sel[1], "copies": sel[2], "label_run": label_run})
            if not label_run:
                break
            lab = con.execute(
                "SELECT any_value(teacher), any_value(teacher_sha256), count(*) FROM pseudo_labels WHERE label_run = ?",
                [label_run],
            ).fetchone()
            chain.append({"kind": "label_run", "name": label_run, "snapshot": snap_of.get(label_run),
                          "rows": lab[2], "teacher": lab[0], "teacher_sha256": lab[1]})
            if is_external(lab[0]):  # soft labels made outside nsd: the chain ends at their teacher
                chain.append({"kind": "external_teacher", "name": lab[0].removeprefix(EXTERNAL), "snapshot": None,
                              "note": "external teacher: soft labels imported by nsd label --from"})
                break
            name = lab[0] if lab[0] != mname else None
    return chain


def _test_acc(con, model: str, metrics: dict):
    """Test top-1 of the model's row (`nsd eval` updates it), else of the training row."""
    for source in (model_metrics(con, model), metrics):
        top1 = ((source or {}).get("eval") or {}).get("test", {}).get("top1")
        if top1 is not None:
            return top1
    return None


def _labeled_rows(con, version) -> int | None:
    if version is None:
        return con.execute("SELECT count(*) FROM images WHERE split = 'labeled'").fetchone()[0]
    return con.execute(
        "SELECT count(*) FROM images AT (VERSION => ?) WHERE split = 'labeled'", [int(version)]
    ).fetchone()[0]
