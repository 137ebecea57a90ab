"""nsd label --calibrate: a temperature fitted on the val split, recorded, applied, reported."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import json_out, new_store, nsd, one_line_error, records
from nsd.engine.calibration import T_RANGE, ece, fit_temperature, nll, softmax


def test_the_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20_000, 10))
    truth = softmax(logits, 2.5)  # a teacher over-confident by a factor 2.5
    labels = np.array([rng.choice(10, p=p) for p in truth])
    t = fit_temperature(logits, labels)
    assert abs(t - 2.5) < 0.1, t
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
    assert ece(softmax(logits, t), labels) < 0.02 < ece(softmax(logits, 1.0), labels)
    assert T_RANGE[0] <= fit_temperature(logits, logits.argmax(axis=1)) <= T_RANGE[1]  # a perfect teacher: bounded


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A teacher trained on 8 images per class of 4, a val split of 40, a pool of 80 (gold hidden);
    labeled plainly and with --calibrate."""
    store = new_store(tmp_path_factory.mktemp("cal") / "store", {"labeled": 8, "val": 10, "unlabeled": 20, "test": 2})
    r = nsd(store, "train", "--name", "t0", "--model", "test_resnet", "--steps", "40", "--batch-size", "16",
            "--no-noise", "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    plain = json_out(nsd(store, "label", "--teacher", "t0", "--json"))
    cal = json_out(nsd(store, "label", "--teacher", "t0", "--calibrate", "--json"))
    return store, plain, cal


def test_calibrate_fits_t_on_the_val_split_and_labels_with_it(calibrated):
    store, plain, cal = calibrated
    fit = cal["calibration"]
    assert fit["split"] == "val" and fit["images"] == 40 and cal["temperature"] == fit["temperature"] != 1.0
    assert fit["nll_after"] <= fit["nll_before"]
    # the run holds softmax(z / T): raised to T and renormalised it is the plain run's softmax(z)
    probs = {}
    for run in (plain["run_id"], cal["run_id"]):
        probs[run] = {r["image_id"]: np.array(r["probs"], np.float64) for r in records(
            store, "SELECT image_id, probs FROM pseudo_labels WHERE label_run = ?", [run])}
    assert probs[plain["run_id"]].keys() == probs[cal["run_id"]].keys() and len(probs[cal["run_id"]]) == 80
    for image, p in probs[cal["run_id"]].items():
        undone = p ** fit["temperature"] / np.sum(p ** fit["temperature"])
        assert np.allclose(undone, probs[plain["run_id"]][image], atol=2e-4), image
        assert p.argmax() == probs[plain["run_id"]][image].argmax()  # T never changes the class
    [params] = records(store, "SELECT params FROM runs WHERE run_id = ?", [cal["run_id"]])
    assert '"calibration"' in params["params"] and str(fit["temperature"]) in params["params"]


def test_the_report_shows_reliability_before_and_after(calibrated, tmp_path):
    store, _, cal = calibrated
    page = tmp_path / "r.html"
    result = nsd(store, "report", "--labels", cal["run_id"], "-o", str(page))
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "Reliability before calibration (T = 1) against 80 hidden gold labels" in html
    assert f"Reliability as labeled (T = {cal['temperature']:g}) against 80 hidden gold labels" in html
    assert f"fitted on 40 images of the val split" in html


def test_calibrate_without_a_val_split_or_with_a_temperature_is_refused(tmp_path):
    store = new_store(tmp_path / "s", {"labeled": 2, "unlabeled": 2})
    nsd(store, "train", "--name", "t0", "--model", "test_resnet", "--steps", "2", "--no-progress")
    one_line_error(nsd(store, "label", "--teacher", "t0", "--calibrate"), contains="--split val")
    one_line_error(nsd(store, "label", "--teacher", "t0", "--calibrate", "--temperature", "2"),
                   contains="leave out --temperature")
    assert not records(store, "SELECT * FROM pseudo_labels")


def test_ingest_puts_labeled_images_in_the_val_split(tmp_path):
    from PIL import Image

    for k in range(4):
        (tmp_path / "src" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / "src" / f"c{k % 2}" / f"{k}.png")
    store = new_store(tmp_path / "s")
    out = json_out(nsd(store, "ingest", str(tmp_path / "src"), "--split", "val", "--json"))
    assert out["added"] == {"labeled": 0, "unlabeled": 0, "test": 0, "val": 4}
    assert records(store, "SELECT split, count(*) AS n, count(label) AS labeled FROM images GROUP BY split") == [
        {"split": "val", "n": 4, "labeled": 4}]
    (tmp_path / "pool").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pool" / "x.png")
    one_line_error(nsd(store, "ingest", str(tmp_path / "pool"), "--split", "val"), contains="no labels")
