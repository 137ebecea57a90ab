"""nsd loop / nsd lineage: the whole method on a real store, resumed after an interruption."""

from __future__ import annotations

import json

import pytest

from helpers import json_out, new_store, nsd, one_line_error
from nsd.engine.balance import balance
from nsd.engine.label import label
from nsd.engine.lineage import lineage
from nsd.engine.loop import report
from nsd.engine.models import get_model_record
from nsd.engine.train import TrainConfig, train

pytestmark = pytest.mark.slow  # every test reads the loop the module fixture trains

# Students of 12 steps: enough to be confident about something, so the next balance has rows.
# The synthetic classes are positions of a bright square: no flips.
LOOP = ["loop", "--name", "ns", "--models", "test_resnet,test_resnet", "--epochs", "3", "--teacher-epochs", "6",
        "--batch-size", "16", "--unlabeled-ratio", "2", "--lr", "5e-3", "--workers", "0", "--no-progress",
        "--label-batch-size", "32", "--hflip", "0", "--json"]


def command_of(store, snapshot):
    return next(s["lineage"].get("command") for s in store.snapshots() if s["snapshot_id"] == snapshot)


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """One iteration by `nsd loop`; then iteration 2 half done by hand (labeled, balanced, student
    stopped after one step), as a killed loop leaves it; then the same loop asked for 2 iterations."""
    # 4 classes with gold labels
    store = new_store(tmp_path_factory.mktemp("loop") / "store", {"labeled": 25, "test": 10, "unlabeled": 30})
    first = nsd(store, *LOOP, "--iterations", "1")
    assert first.exit_code == 0, first.output
    first = json_out(first)

    images = store.tags()["ns-images"]
    lab = label(store, "ns-m1", images=images, batch_size=32, progress=False)
    balance(store, "ns-sel2", run=lab["run_id"])
    cut = TrainConfig(name="ns-m2", arch="test_resnet", selection="ns-sel2", images=str(images), epochs=1,
                      batch_size=16, unlabeled_ratio=2, lr=5e-3, workers=0, progress=False)
    assert train(store, cut, stop_after_steps=1) is None

    second = nsd(store, *LOOP, "--iterations", "2")
    assert second.exit_code == 0, second.output
    return store, first, json_out(second), second.stderr


def test_each_step_is_a_tagged_snapshot_of_its_command(looped):
    store, first, _, _ = looped
    assert [(s["iteration"], s["step"], s["status"]) for s in first["steps"]] == [
        (0, "teacher", "ran"), (1, "label", "ran"), (1, "balance", "ran"), (1, "student", "ran")]
    tags = store.tags()
    want = {"teacher": "train", "label": "label", "balance": "balance", "student": "train"}
    for s in first["steps"]:
        assert tags[s["tag"]] == s["snapshot"]
        assert command_of(store, s["snapshot"]) == want[s["step"]]
    snaps = [s["snapshot"] for s in first["steps"]]
    assert snaps == sorted(set(snaps))  # four distinct snapshots, in order


def test_students_start_from_their_teacher(looped):
    store = looped[0]
    m0, m1 = get_model_record(store, "ns-m0"), get_model_record(store, "ns-m1")
    assert m0["init"] is None
    assert m1["init"]["model"] == "ns-m0" and m1["init"]["sha256"] == m0["sha256"]


def test_interrupted_loop_resumes_at_the_step_it_stopped_in(looped):
    store, first, second, log = looped
    assert [(s["iteration"], s["step"], s["status"]) for s in second["steps"]] == [
        (0, "teacher", "done before"), (1, "label", "done before"), (1, "balance", "done before"),
        (1, "student", "done before"), (2, "label", "done before"), (2, "balance", "done before"),
        (2, "student", "ran")]
    assert "resuming student ns-m2" in log
    # Nothing was redone: the finished steps point at the snapshots of the first run.
    assert [s["snapshot"] for s in second["steps"][:4]] == [s["snapshot"] for s in first["steps"]]
    assert store.tags()["ns-it2-student"] == second["steps"][-1]["snapshot"]
    m2 = get_model_record(store, "ns-m2")
    assert m2["selection"] == "ns-sel2" and m2["teacher"] == "ns-m1"
    with store.reader() as con:  # the resumed student is registered once
        assert con.execute("SELECT count(*) FROM models WHERE model = 'ns-m2'").fetchone()[0] == 1


def test_final_table_has_sizes_and_accuracies(looped):
    store, _, second, _ = looped
    table = second["table"]
    assert [r["iteration"] for r in table] == [0, 1, 2]
    assert [r["model"] for r in table] == ["ns-m0", "ns-m1", "ns-m2"]
    assert table[0]["selection_size"] is None and table[0]["pseudo_label_acc"] is None
    with store.reader() as con:
        for r in table[1:]:
            run, rows, copies = con.execute(
                "SELECT any_value(label_run), count(*), sum(copies) FROM selections WHERE selection = ?",
                [r["selection"]]).fetchone()
            acc = con.execute(
                "SELECT avg((p.predicted = i.gold_label)::DOUBLE) FROM pseudo_labels p JOIN images i USING "
                "(image_id) WHERE p.label_run = ?", [run]).fetchone()[0]
            assert (r["selection_images"], r["selection_size"]) == (rows, copies)
            assert r["pseudo_label_acc"] == pytest.approx(acc)
    for r in table:
        rec = get_model_record(store, r["model"])
        assert r["test_acc"] == rec["metrics"]["eval"]["test"]["top1"] and r["params"] == rec["num_params"]
    assert table[0]["test_acc"] > 0.5  # the teacher learned (chance is 0.25)
    assert report(store, "ns") == table
    text = nsd(store, *LOOP[:-1], "--iterations", "2")  # all done: prints the table, runs nothing
    assert text.exit_code == 0 and "ns-m2" in text.stdout and "pseudo-label acc" in text.stdout


def test_lineage_traces_back_to_the_labeled_data(looped):
    store, _, second, _ = looped
    chain = lineage(store, "ns-m2")
    assert [(link["kind"], link["name"]) for link in chain] == [
        ("model", "ns-m2"), ("selection", "ns-sel2"), ("label_run", chain[2]["name"]),
        ("model", "ns-m1"), ("selection", "ns-sel1"), ("label_run", chain[5]["name"]),
        ("model", "ns-m0"), ("labeled_data", "images (labeled split)")]
    tags = store.tags()
    steps = {(s["iteration"], s["step"]): s for s in second["steps"]}
    assert chain[0]["snapshot"] == tags["ns-it2-student"]
    assert chain[1]["snapshot"] == tags["ns-it2-balance"]
    assert chain[2]["snapshot"] == tags["ns-it2-label"] and chain[2]["name"] == steps[2, "label"]["name"]
    assert chain[2]["teacher"] == "ns-m1" and chain[5]["teacher"] == "ns-m0"
    for link in (chain[0], chain[3], chain[6]):
        assert link["test_acc"] == get_model_record(store, link["name"])["metrics"]["eval"]["test"]["top1"]
    assert chain[6]["snapshot"] == tags["ns-it0-teacher"]
    assert chain[7]["snapshot"] == tags["ns-images"] and chain[7]["rows"] == 100
    out = nsd(store, "lineage", "ns-m2", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout) == json.loads(json.dumps(chain))
    text = nsd(store, "lineage", "ns-m2")
    assert text.exit_code == 0 and "ns-sel1" in text.stdout and "labeled_data" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["loop", "--models", "no_such_arch_xyz"], "unknown"),
    (["loop", "--models", "test_resnet", "--iterations", "0"], "--iterations"),
    (["loop", "--name", "ns", "--models", "lcnet_050"], "ns-m0 exists with architecture 'test_resnet'"),
    (["loop", "--name", "9x", "--models", "test_resnet"], "invalid loop name"),
    (["lineage", "nope"], "unknown model 'nope'"),
])
def test_errors_are_one_line(looped, args, message):
    store = looped[0]
    one_line_error(nsd(store, *args), 2, message)


def test_baseline_is_the_final_architecture_on_labels_alone_for_the_loops_total_steps(looped):
    store, _, _, _ = looped
    res = nsd(store, *LOOP, "--iterations", "2", "--baseline")
    assert res.exit_code == 0, res.output
    out = json_out(res)
    assert out["steps"][-1]["step"] == "baseline" and out["steps"][-1]["status"] == "ran"
    assert [s["status"] for s in out["steps"][:-1]] == ["done before"] * 7  # nothing else redone
    base, final = get_model_record(store, "ns-baseline"), get_model_record(store, "ns-m2")
    assert base["selection"] is None and base["teacher"] is None and base["arch"] == final["arch"]
    assert base["noise"] == get_model_record(store, "ns-m1")["noise"]  # the loop's student options (m2 was
    # started by hand in the fixture)
    # compute-matched: as many steps as the teacher and both students together
    loop_steps = [get_model_record(store, f"ns-m{i}")["metrics"]["epochs"][-1]["steps"] for i in range(3)]
    assert base["metrics"]["epochs"][-1]["steps"] == sum(loop_steps) > max(loop_steps)
    assert store.tags()["ns-it2-baseline"] == out["steps"][-1]["snapshot"]
    row = out["table"][-1]
    assert row["iteration"] is None and row["model"] == "ns-baseline" and row["selection_size"] is None
    assert row["test_acc"] == base["metrics"]["eval"]["test"]["top1"]
    assert row["steps"] == row["total_steps"] == sum(loop_steps)
    # each student against its teacher and the baseline; one below either is flagged
    students = out["table"][1:-1]
    for r, teacher in zip(students, out["table"]):
        assert r["vs_teacher"] == pytest.approx(r["test_acc"] - teacher["test_acc"])
        assert r["vs_baseline"] == pytest.approx(r["test_acc"] - row["test_acc"])
        below = [w for w, d in (("its teacher", r["vs_teacher"]), ("the baseline", r["vs_baseline"])) if d < 0]
        assert r["flag"] == ("below " + " and ".join(below) if below else None)
        assert (f"warning: {r['model']}" in res.stderr) == bool(below)
    text = nsd(store, *LOOP[:-1], "--iterations", "2", "--baseline")  # done before: the table only
    assert text.exit_code == 0 and "baseline" in text.stdout and "ns-baseline" in text.stdout
