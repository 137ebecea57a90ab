"""Temperature scaling of a teacher (`nsd label --calibrate`): one number T fitted so that
softmax(logits / T) is as likely as possible (least negative log-likelihood) on labeled images
the teacher never trained on, the store's ``val`` split (Guo et al., "On calibration of modern
neural networks", ICML 2017). T changes confidences, never the predicted class.

Why a val split, not the others: the labeled split trained the teacher (it is over-confident
there, so T would come out too small), and fitting on the test split would tune the pipeline to
the numbers it is judged by. k-fold teachers would cost k more trainings; a few hundred held-out
labeled images suffice for one parameter.
"""

from __future__ import annotations

import numpy as np

from nsd.engine.errors import UsageError
from nsd.engine.transforms import eval_batch

CALIBRATION_SPLIT = "val"
MAX_IMAGES = 50_000  # val images used (the first by image id): enough for one parameter
T_RANGE = (0.05, 20.0)
ECE_BINS = 15


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in T_RANGE with the least mean NLL of softmax(logits / T) (bounded 1-D search)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                            bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| over equal-width confidence bins,
    weighted by the share of images in each."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(float((pred[inside] == labels[inside]).mean()) - float(conf[inside].mean()))
    return total


def calibrate(con, net, info, device, batch_size: int) -> dict:
    """Fit the teacher NET's temperature on the val split of the pinned connection CON; the
    fit and its effect, for the label run's lineage."""
    import torch

    rows = con.execute(f"SELECT bytes, label FROM images WHERE split = '{CALIBRATION_SPLIT}' AND label IS NOT NULL "
                       f"ORDER BY image_id LIMIT {MAX_IMAGES}").fetchall()
    if not rows:
        raise UsageError("--calibrate needs labeled images no model trained on: ingest some with "
                         "`nsd ingest SOURCE --split val`")
    labels = np.array([r[1] for r in rows])
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise UsageError(f"val labels outside the teacher's {info.num_classes} classes")
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            x = eval_batch([r[0] for r in rows[i:i + batch_size]], int(info.image_size or 0), int(info.in_chans),
                           info.mean, info.std)
            chunks.append(net(x.to(device)).float().cpu().numpy().astype(np.float64))
    logits = np.concatenate(chunks)
    if not np.isfinite(logits).all():
        raise UsageError("the teacher's outputs on the val split are not finite numbers: cannot calibrate")
    t = fit_temperature(logits, labels)
    return {"split": CALIBRATION_SPLIT, "images": len(rows), "temperature": round(t, 4),
            "nll_before": round(nll(logits, labels, 1.0), 4), "nll_after": round(nll(logits, labels, t), 4),
            "ece_before": round(ece(softmax(logits, 1.0), labels), 4),
            "ece_after": round(ece(softmax(logits, t), labels), 4),
            "accuracy": round(float((logits.argmax(axis=1) == labels).mean()), 4)}
