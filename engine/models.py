"""Models: timm factory, safe checkpoints, and the `models` table.

Checkpoints are safetensors files (or plain state dicts read with ``weights_only=True``), so
loading a model never runs pickled code. A model in the store is one row of ``models``; its
checkpoint lives under the store's data path at ``checkpoints/<name>/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import fsspec

from nsd.engine.env import env_number
from nsd.engine.errors import NsdError, UsageError, first_line
from nsd.engine.paths import exists as path_exists
from nsd.engine.paths import read_capped, write_url
from nsd.engine.store import Store, check_name

# The largest weights file nsd reads (the whole file is read into memory); NSD_MAX_WEIGHTS_BYTES.
MAX_WEIGHTS_BYTES = 8 << 30


def max_weights_bytes() -> int:
    return int(env_number("NSD_MAX_WEIGHTS_BYTES", MAX_WEIGHTS_BYTES, lo=1, integer=True,
                          must="a positive number of bytes"))

# Grey and RGB defaults when a teacher from elsewhere brings no normalisation of its own.
DEFAULT_MEAN = {1: (0.5,), 3: (0.485, 0.456, 0.406)}
DEFAULT_STD = {1: (0.5,), 3: (0.229, 0.224, 0.225)}


@dataclass
class ModelInfo:
    """What it takes to rebuild a model and feed it: one `models` row, minus metrics."""

    arch: str
    num_classes: int
    in_chans: int = 1
    image_size: int = 28
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    class_names: list = field(default_factory=list)
    name: str | None = None
    checkpoint: str | None = None
    sha256: str | None = None
    record: dict = field(default_factory=dict)


def create_model(arch: str, num_classes: int, in_chans: int = 1, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pretrained: bool = False, **kwargs: Any):
    """A timm model: randomly initialised, or with ``pretrained`` timm's weights for ARCH from
    its hub (the classifier is replaced for NUM_CLASSES, the stem adapted to IN_CHANS)."""
    import timm

    # Only timm's own architecture names: timm also takes `hf-hub:...` (a network look-up) and
    # `local-dir:...` (a path recorded as the architecture); weights from elsewhere come in
    # through --pretrained-file instead.
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UsageError(f"unknown timm architecture {arch!r} (a plain name such as resnet18; "
                         "local weights: --pretrained-file)")
    if pretrained and not timm.is_model_pretrained(arch):
        raise UsageError(f"timm has no pretrained weights for {arch!r}")
    if pretrained and not _hub_reachable():
        # The hub client retries for minutes; unreachable, use its cache alone (fails fast).
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                 drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UsageError(f"unknown timm architecture {arch!r}") from None
        if not pretrained:
            raise
        reason = exc
    except TypeError as exc:  # some archs take no drop_path_rate
        if "drop_path_rate" in str(exc) and drop_path_rate == 0.0:
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                     drop_rate=drop_rate, **kwargs)
        raise
    except Exception as exc:  # the hub's many ways of being unreachable (OSError, HTTP, offline mode)
        if not pretrained:
            raise
        reason = exc
    first = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
    raise UsageError(f"cannot download pretrained weights for {arch} ({first[:200]}); "
                     "use --pretrained-file FILE with weights saved on this machine") from None


def _hub_reachable(timeout: float = 5.0) -> bool:

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # unreachable, or a malformed HF_ENDPOINT port
        return False


def pretrained_normalisation(model, in_chans: int) -> tuple[tuple, tuple]:
    """The mean/std the pretrained weights expect (timm's pretrained_cfg). A grey model made
    from RGB weights sums the stem over R, G, B, so it gets the channel average."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


def load_pretrained(model, state: dict, source: str) -> bool:
    """Load weights trained elsewhere into MODEL: a classifier of another shape is left freshly
    initialised (a new head), a stem for another channel count is adapted as timm does.
    Returns whether the head was replaced; any other mismatch is a UsageError."""
    from timm.models import adapt_input_conv

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    stems = cfg.get("first_conv") or ()
    stems = (stems,) if isinstance(stems, str) else tuple(stems)
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for stem in stems:
        key = stem + ".weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            state[key] = adapt_input_conv(own[key].shape[1], state[key], base_chans=state[key].shape[1])

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    dropped = [k for k in state if in_head(k) and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        del state[key]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UsageError(f"weights of {source} do not fit {type(model).__name__}: {_mismatch(exc)}") from None
    body_missing = [k for k in missing if not in_head(k)]
    if body_missing or unexpected:
        what = ", ".join((body_missing + list(unexpected))[:3])
        raise UsageError(f"weights of {source} do not fit this architecture: {len(body_missing)} missing, "
                         f"{len(unexpected)} unexpected tensors (e.g. {what})")
    return bool(dropped) or any(in_head(k) for k in missing)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model_or_state, path: str) -> str:
    """Write weights as safetensors; returns the file's sha256."""
    from safetensors.torch import save

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    # safetensors refuses shared/non-contiguous storage: store independent contiguous copies.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    data = save(state)
    write_url(path, data)  # never half a checkpoint, even when the disk fills
    return hashlib.sha256(data).hexdigest()


def read_state_dict(path: str) -> dict:
    """Weights from safetensors, or a torch state dict loaded with weights_only=True."""
    import torch
    from safetensors.torch import load

    try:
        fs, fpath = fsspec.core.url_to_fs(path)
        info = fs.info(fpath)
        # Only a plain file of a sane size: a FIFO would hang the read, a device never end it.
        if info.get("type") != "file" or (fs.protocol in ("file", ("file", "local")) and not
                                           stat.S_ISREG(os.stat(fpath).st_mode)):
            raise UsageError(f"weights {path} is not a regular file")
        cap = max_weights_bytes()
        if (info.get("size") or 0) > cap:
            raise UsageError(f"weights file {path} is larger than {cap:,} bytes (NSD_MAX_WEIGHTS_BYTES)")
        with fs.open(fpath, "rb") as f:
            data = read_capped(f, cap)
        if data is None:
            raise UsageError(f"weights file {path} is larger than {cap:,} bytes (NSD_MAX_WEIGHTS_BYTES)")
    except FileNotFoundError:
        raise UsageError(f"weights file not found: {path}") from None
    if path.endswith(".safetensors") or data[:8] and _looks_like_safetensors(data):
        try:
            return load(data)
        except Exception as exc:
            raise UsageError(f"cannot read weights {path}: {exc}") from None

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read weights {path} (safetensors or a weights_only state dict): "
                         f"{first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"weights file {path} does not hold a state dict")
    return state


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    n = int.from_bytes(data[:8], "little")
    return 0 < n < len(data) and data[8:9] == b"{"


def load_state(model, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"weights do not fit {what}: {_mismatch(exc)}") from None


def _mismatch(exc: RuntimeError) -> str:
    """The line of a load_state_dict error that names the first tensor that does not fit."""
    lines = str(exc).splitlines()
    return next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0] if lines else "")[:300]


def checkpoint_path(store: Store, name: str, filename: str = "model.safetensors") -> str:
    return store.path("checkpoints", check_name(name, "model name"), filename)


# --------------------------------------------------------------------------- the models table


def get_model_record(store: Store, name: str, snapshot: int | None = None) -> dict:
    """The newest `models` row named NAME at SNAPSHOT (default latest) as a dict."""
    with store.reader(snapshot) as con:
        cur = con.execute("SELECT * FROM models WHERE model = ? ORDER BY created_at DESC LIMIT 1", [name])
        row = cur.fetchone()
        if row is None:
            raise UsageError(f"unknown model {name!r}")
        cols = [d[0] for d in cur.description]
    rec = dict(zip(cols, row))
    for key in ("noise", "metrics", "init"):
        if isinstance(rec.get(key), str):
            rec[key] = json.loads(rec[key])
    if rec.get("checkpoint"):
        rec["checkpoint"] = store.absolute_path(rec["checkpoint"])
    return rec


def model_exists(store: Store, name: str) -> bool:
    with store.reader() as con:
        return has_model(con, name)


def has_model(con, name: str) -> bool:
    """Whether CON's `models` has a row named NAME (inside a write: atomic with its commit)."""
    return con.execute("SELECT 1 FROM models WHERE model = ? LIMIT 1", [name]).fetchone() is not None


def model_metrics(con, name: str) -> dict:
    """The metrics of model NAME's row in CON ({} when none or unknown)."""
    row = con.execute("SELECT metrics FROM models WHERE model = ? ORDER BY created_at DESC LIMIT 1", [name]).fetchone()
    return json.loads(row[0]) if row and row[0] else {}


def info_from_record(rec: dict) -> ModelInfo:
    return ModelInfo(
        arch=rec["arch"], num_classes=int(rec["num_classes"]), in_chans=int(rec["in_chans"]),
        image_size=int(rec["image_size"]), mean=tuple(rec["mean"]), std=tuple(rec["std"]),
        class_names=list(rec.get("class_names") or []), name=rec["model"],
        checkpoint=rec["checkpoint"], sha256=rec["sha256"], record=rec,
    )


def load_model(store: Store, model: str, weights: str | None = None, *, num_classes: int | None = None,
               in_chans: int | None = None, image_size: int | None = None, mean=None, std=None):
    """Rebuild a model for inference: returns (torch module in eval mode, ModelInfo).

    MODEL is a model in the store (its checkpoint is verified against the recorded sha256),
    or, with WEIGHTS, a timm architecture trained elsewhere (num_classes/in_chans needed).
    """
    if weights is None:
        info = info_from_record(get_model_record(store, model))
        digest = file_sha256(info.checkpoint)
        if info.sha256 and digest != info.sha256:
            raise NsdError(f"checkpoint of model {model!r} changed since it was registered "
                           f"(sha256 {digest[:12]} != {info.sha256[:12]})")
        path = info.checkpoint
    else:
        if num_classes is None or in_chans is None:
            raise UsageError("a teacher from a weights file needs num_classes and in_chans")
        info = ModelInfo(arch=model, num_classes=num_classes, in_chans=in_chans,
                         image_size=image_size or 28,
                         mean=tuple(mean or DEFAULT_MEAN.get(in_chans, (0.5,) * in_chans)),
                         std=tuple(std or DEFAULT_STD.get(in_chans, (0.5,) * in_chans)),
                         name=None, checkpoint=weights, sha256=None)
        digest = file_sha256(weights) if path_exists(weights) else None
        if digest is None:
            raise UsageError(f"weights file not found: {weights}")
        info.sha256 = digest
        path = weights
    net = create_model(info.arch, info.num_classes, info.in_chans)
    load_state(net, read_state_dict(path), f"{info.arch} with {info.num_classes} classes")
    net.eval()
    return net, info


MODEL_COLUMNS = (
    "model", "run_id", "arch", "num_classes", "class_names", "in_chans", "image_size", "mean", "std",
    "noise", "selection", "selection_version", "images_version", "teacher", "num_params", "metrics",
    "checkpoint", "sha256", "created_at", "init",
)


def insert_model_row(con, rec: dict) -> None:
    """Append one `models` row (inside a Store.write transaction); JSON fields are serialised."""
    row = dict(rec)
    _add_init_column(con)
    for key in ("noise", "metrics", "init"):
        if row.get(key) is not None and not isinstance(row[key], str):
            row[key] = json.dumps(row[key], sort_keys=True)
    cols = ", ".join(MODEL_COLUMNS)
    con.execute(f"INSERT INTO models ({cols}) VALUES ({', '.join('?' * len(MODEL_COLUMNS))})",
                [row.get(c) for c in MODEL_COLUMNS])


def _add_init_column(con) -> None:
    """Stores made before `models.init` existed get it in the writing transaction itself."""
    cols = [r[0] for r in con.execute("DESCRIBE models").fetchall()]
    if "init" not in cols:
        con.execute("ALTER TABLE models ADD COLUMN init VARCHAR")
