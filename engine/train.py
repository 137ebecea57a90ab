"""Training a teacher or a noised student from the store, and evaluating models.

``train(store, TrainConfig(...))`` reads one pinned snapshot, streams batches (engine/stream),
and registers the result as one `models` row in one snapshot. Read it top to bottom:
setup -> data -> model -> optimizer -> loop -> save -> register.

Loss (as in the official Noisy Student code): each step takes a labeled batch of B images and a
pseudo-labeled batch of R*B images through the model together;
``loss = CE_smooth0.1(labeled) + SoftCE(pseudo)``, each term a mean over its own batch.
A teacher (no selection) trains on the labeled batch alone.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import fsspec

from nsd.engine.errors import UsageError
from nsd.engine.guards import check_finite_loss, check_finite_weights
from nsd.engine.models import (checkpoint_path, count_params, create_model, get_model_record,
                               insert_model_row, load_model, model_exists, save_weights)
from nsd.engine.runtime import tune_malloc
from nsd.engine.store import Store, check_name, name_literal, now_utc

# Noise defaults on small grey images (paper values on ImageNet in the README). Teachers and
# students both train with them: the teacher is the best supervised model we can make; only
# labeling is unnoised.
NOISE_DEFAULTS = {"randaug_n": 2, "randaug_m": 9.0, "drop_rate": 0.2, "drop_path_rate": 0.1,
                  "random_erasing": 0.25}
MEAN, STD = 0.5, 0.5  # normalisation of a model trained from scratch: [0, 1] pixels to [-1, 1]


@dataclass
class TrainConfig:
    name: str
    arch: str
    selection: str | None = None        # NAME or NAME@REF; None trains a teacher on labels only
    images: str | None = None           # store version of the images (default: latest at start)
    epochs: int = 10
    steps: int | None = None            # total optimiser steps; overrides epochs (fixed budgets)
    batch_size: int = 64                # labeled batch B
    unlabeled_ratio: int = 3            # pseudo-labeled batch is R*B
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    image_size: int | None = None       # default: the images' own size
    device: str = "auto"
    workers: int = 2
    noise: bool | None = None           # None or True: on (teacher and student); False: all off
    randaug_n: int | None = None
    randaug_m: float | None = None
    drop_rate: float | None = None
    drop_path_rate: float | None = None
    random_erasing: float | None = None
    hflip: float = 0.5                  # flip probability of the training crop (0 for digits, text)
    pretrained: bool = False            # timm's pretrained weights for ARCH (from its hub)
    pretrained_file: str | None = None  # ... or from a local file (safetensors / weights-only state dict)
    init_from: str | None = None        # ... or from a model in the store
    ema: float | None = None            # EMA decay; the registered weights are the EMA ones
    eval_split: str | None = "test"     # evaluated at the end when that split has images
    save_every: int = 0                 # also checkpoint the training state every N steps
    progress: bool = True
    # Filled in at start and kept in the resumable state, so a resumed run reads the same data.
    resolved: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- setup helpers


def resolve_noise(cfg: TrainConfig) -> dict:
    """The noise a run uses: the defaults unless ``--no-noise``, which turns every kind off;
    explicit values win otherwise. Teacher and student alike (the paper's teacher is trained
    with noise too; it labels without it)."""
    out = {}
    for key, default in NOISE_DEFAULTS.items():
        given = getattr(cfg, key)
        if key == "randaug_m":  # a magnitude, not a switch: N=0 turns RandAugment off
            out[key] = given if given is not None else default
        elif cfg.noise is False:
            out[key] = 0
        else:
            out[key] = given if given is not None else default
    out["randaug_n"], out["randaug_m"] = int(out["randaug_n"]), float(out["randaug_m"])
    for key in ("drop_rate", "drop_path_rate", "random_erasing"):
        out[key] = float(out[key])
    if out["randaug_n"] < 0 or not 0 <= out["randaug_m"] <= 30:
        raise UsageError("--randaug-n must be >= 0 and --randaug-m between 0 and 30")
    if not (0 <= out["drop_rate"] < 1 and 0 <= out["drop_path_rate"] < 1 and 0 <= out["random_erasing"] <= 1):
        raise UsageError("--drop-rate and --drop-path-rate must be in [0, 1), --random-erasing in [0, 1]")
    return out


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    return dev


def _dist():
    """(rank, world_size, local_rank); initialises torch.distributed from torchrun's env vars."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _data_facts(store: Store, version: int) -> dict:
    with store.reader() as con:
        names = [r[0] for r in con.execute(
            "SELECT name FROM classes AT (VERSION => ?) ORDER BY class_id", [version]).fetchall()]
        row = con.execute(
            "SELECT max(channels), mode(width), count(*) FILTER (WHERE split = 'labeled'), "
            "count(*) FILTER (WHERE split = 'test') FROM images AT (VERSION => ?) WHERE split <> 'unlabeled'",
            [version]).fetchone()
    if not names:
        raise UsageError(f"no classes in the store at version {version} (ingest a labeled data set first)")
    # Grey images train a 1-channel model; anything with colour (RGB, RGBA, CMYK, palettes)
    # a 3-channel one: decode() converts every image to that.
    return {"class_names": names, "in_chans": 3 if (row[0] or 1) > 1 else 1, "width": int(row[1] or 28),
            "labeled": int(row[2] or 0), "test": int(row[3] or 0)}


def _selection_facts(store: Store, name: str, version: int) -> dict:
    with store.reader() as con:
        n, runs = con.execute(
            "SELECT count(*), list(DISTINCT label_run) FROM selections AT (VERSION => ?) "
            f"WHERE selection = {name_literal(name, 'selection')}", [version]).fetchone()
        if not n:
            raise UsageError(f"unknown selection {name!r} at version {version} (write one with `nsd balance`)")
        teachers = [r[0] for r in con.execute(
            "SELECT DISTINCT teacher FROM pseudo_labels AT (VERSION => ?) WHERE list_contains(?, label_run) "
            "AND teacher IS NOT NULL ORDER BY 1", [version, [r for r in runs if r]]).fetchall()]
    return {"rows": int(n), "label_runs": [r for r in runs if r], "teacher": ",".join(teachers) or None}


def resolve_run(store: Store, cfg: TrainConfig) -> dict:
    """Pin versions and facts once at start (kept in the resumable state)."""
    check_name(cfg.name, "model name")
    latest = store.resolve(None)
    images_version = store.resolve(cfg.images) if cfg.images else latest
    out = {"images_version": images_version, "selection": None, "selection_version": None, "teacher": None}
    if cfg.selection:
        name, _, ref = cfg.selection.partition("@")
        check_name(name, "selection")
        out["selection"] = name
        out["selection_version"] = store.resolve(ref) if ref else latest
        facts = _selection_facts(store, name, out["selection_version"])
        out["teacher"], out["selection_rows"] = facts["teacher"], facts["rows"]
    facts = _data_facts(store, images_version)
    if facts["labeled"] == 0 and not cfg.selection:
        raise UsageError(f"no labeled images at version {images_version}: nothing to train a teacher on")
    out.update(facts)
    out["image_size"] = int(cfg.image_size or facts["width"])
    out["noise"] = resolve_noise(cfg)
    if not 0 <= cfg.hflip <= 1:
        raise UsageError(f"--hflip must be a probability in [0, 1], got {cfg.hflip}")
    if sum(map(bool, (cfg.pretrained, cfg.pretrained_file, cfg.init_from))) > 1:
        raise UsageError("use one of --pretrained, --pretrained-file and --init-from")
    return out


def _state_path(store, name):
    return checkpoint_path(store, name, "train_state.pt")


def has_saved_state(store: Store, name: str) -> bool:
    """Whether an interrupted run NAME left a resumable state."""
    return _exists(_state_path(store, name))


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _save_state(path: str, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(path + ".tmp", "wb") as f:  # write then rename: a crash never leaves half a state
        f.write(buf.getvalue())
    fs.mv(p + ".tmp", p)


def _load_state(path: str) -> dict:
    import torch

    with fsspec.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def lr_at(step: int, total: int, lr: float, warmup_frac: float) -> float:
    """Linear warmup, then cosine decay to 0 (a function of the step: nothing to checkpoint)."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class _Progress:
    """A rich progress bar (rank 0) showing loss, images/s and ETA; silent when disabled."""

    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                              TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self.p.start()

    def task(self, desc, total, done):
        return self.p.add_task(desc, total=total, completed=done, loss=float("nan"), ips=0.0) if self.p else None

    def update(self, task, **kw):
        if self.p:
            self.p.update(task, advance=1, **kw)

    def close(self):
        if self.p:
            self.p.stop()


# --------------------------------------------------------------------------- training


def train(store: Store, cfg: TrainConfig, resume: bool = False, stop_after_steps: int | None = None) -> dict | None:
    """Train NAME and register it in `models` (one snapshot). Returns the registered record.

    With ``resume`` the run continues from checkpoints/NAME/train_state.pt with the settings and
    pinned versions saved there. ``stop_after_steps`` saves the training state after that many
    steps and returns None (what an interruption does), for tests and time-boxed jobs.
    """
    import torch

    from nsd.engine import stream
    from nsd.engine.transforms import train_transform

    store.require()
    check_name(cfg.name, "model name")
    tune_malloc()
    rank, world, local_rank = _dist()
    state_path = _state_path(store, cfg.name)

    # ---- what to train on: pinned versions, or those of the run being resumed
    state = None
    if resume:
        if not _exists(state_path):
            raise UsageError(f"nothing to resume: no training state for {cfg.name!r} at {state_path}")
        state = _load_state(state_path)
        cfg = TrainConfig(**{f.name: state["config"][f.name] for f in fields(TrainConfig) if f.name in state["config"]})
        if model_exists(store, cfg.name):
            raise UsageError(f"model {cfg.name!r} already finished and is registered")
    else:
        if model_exists(store, cfg.name):
            raise UsageError(f"model {cfg.name!r} already exists; pick another --name")
        if _exists(state_path):
            raise UsageError(f"an unfinished run named {cfg.name!r} exists; continue it with --resume")
        cfg.resolved = resolve_run(store, cfg)
    R = cfg.resolved
    noise, student = R["noise"], R["selection"] is not None
    C, in_chans, size = len(R["class_names"]), R["in_chans"], R["image_size"]
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank if world > 1 else device)
        device = torch.device("cuda", local_rank) if world > 1 else device

    # ---- model (same init on every rank; DDP also broadcasts it)
    torch.manual_seed(cfg.seed)
    model = build_model(store, cfg, R, fresh=state is None).to(device)
    mean, std = tuple(R["mean"]), tuple(R["std"])
    num_params = count_params(model)
    if student and R.get("teacher") and rank == 0 and not resume:
        _warn_if_smaller(store, R["teacher"], num_params)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    epoch, batch_in_epoch, step, history = 0, 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch"], state["step"]
        history = json.loads(state["history"])
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    with store.staging() as stage, contextlib.ExitStack() as stack:
        # ---- data: stage plans of the pinned snapshot, then stream batches
        stage = Path(stage) / f"rank{rank}"
        lab_plan = stream.stage_split(store, R["images_version"], "labeled", stage, cfg.seed, C)
        pse_plan = (stream.stage_selection(store, R["selection"], R["selection_version"], R["images_version"],
                                           stage, cfg.seed, C) if student else None)
        tf = train_transform(size, mean, std, noise["randaug_n"], noise["randaug_m"], in_chans,
                             hflip=cfg.hflip, random_erasing=noise["random_erasing"])
        B = cfg.batch_size
        main_plan, main_bs = (pse_plan, B * cfg.unlabeled_ratio) if student else (lab_plan, B)
        steps_per_epoch = stream.batches_per_epoch(main_plan, main_bs, world)
        if steps_per_epoch == 0:
            raise UsageError("the training set is empty")
        # A step budget (--steps) runs whole epochs and stops mid-way through the last one.
        total_steps = cfg.steps or steps_per_epoch * cfg.epochs
        num_epochs = math.ceil(total_steps / steps_per_epoch)

        def loader(plan, bs, ep, skip, cycle, seed):
            ds = stream.StoreStream(plan, bs, tf, in_chans=in_chans, seed=seed, epoch=ep, skip_batches=skip,
                                    rank=rank, world_size=world, cycle=cycle, image_size=size)
            return iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                prefetch_factor=4 if cfg.workers else None))

        # The labeled stream of a student cycles; step s always uses labeled batch s of it.
        lab_iter = (loader(lab_plan, B, 0, step, True, cfg.seed + 1)
                    if student and lab_plan.num_rows else None)
        bar = _Progress(cfg.progress and rank == 0)
        stack.callback(bar.close)

        sums = torch.zeros(4, dtype=torch.float64)  # loss, labeled loss, pseudo loss, steps (this epoch)
        if state is not None and state.get("sums") is not None and rank == 0:  # others: their part is lost
            sums = state["sums"].clone()

        def save_state(ep, b):
            if rank == 0:
                _save_state(state_path, {
                    "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                    "epoch": ep, "batch": b, "step": step, "history": json.dumps(history),
                    "sums": sums if b else torch.zeros(4, dtype=torch.float64)})
            _barrier(world)

        # One loader for the whole run: it runs on from epoch to epoch (same batches as one loader
        # per epoch), so DataLoader workers start once, not once per epoch (a teacher on 1,000
        # labels has 16 steps an epoch: restarting workers cost more than the steps).
        main_iter = loader(main_plan, main_bs, epoch, batch_in_epoch, True, cfg.seed)
        stop = stack.enter_context(_StopBetweenSteps())
        try:
            while epoch < num_epochs:
                net.train()
                epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                task = bar.task(f"{cfg.name} epoch {epoch + 1}/{num_epochs}", epoch_steps, batch_in_epoch)
                t0, seen = time.perf_counter(), 0
                for batch in itertools.islice(main_iter, max(0, epoch_steps - batch_in_epoch)):
                    if step >= total_steps:
                        break
                    # Per-step seed: dropout/drop-path noise is reproducible on resume.
                    torch.manual_seed(_step_seed(cfg.seed, step, rank))
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, total_steps, cfg.lr, cfg.warmup_frac)
                    # One forward pass over the labeled batch, then the pseudo-labeled one.
                    targets = batch["y"].to(device) if student else None
                    labeled = (next(lab_iter) if lab_iter is not None else None) if student else batch
                    if labeled is None:  # a student with no labeled images at all
                        labeled = {"x": batch["x"][:0], "y": torch.zeros(0, dtype=torch.long)}
                    x = torch.cat([labeled["x"], batch["x"]]) if student else labeled["x"]
                    x = x.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        logits = net(x).float()
                    loss, loss_l, loss_u = noisy_student_loss(logits, labeled["y"].to(device), targets,
                                                              cfg.label_smoothing)
                    check_finite_loss(loss, step)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update(model, step=step)
                    step += 1
                    batch_in_epoch += 1
                    seen += len(x)
                    sums += torch.tensor([loss.item(), loss_l.item(), loss_u.item(), 1.0], dtype=torch.float64)
                    bar.update(task, loss=loss.item(), ips=seen * world / max(1e-9, time.perf_counter() - t0))
                    if cfg.save_every and step % cfg.save_every == 0:
                        save_state(epoch, batch_in_epoch)
                    if stop_after_steps is not None and step >= stop_after_steps:
                        save_state(epoch, batch_in_epoch)
                        return None
                    if stop.signal is not None:  # Ctrl-C / SIGTERM: stop here, between two steps
                        save_state(epoch, batch_in_epoch)
                        raise KeyboardInterrupt
                if world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(sums)
                n = max(1.0, sums[3].item())
                history.append({"epoch": epoch + 1, "steps": step, "loss": sums[0].item() / n,
                                "labeled_loss": sums[1].item() / n, "pseudo_loss": sums[2].item() / n,
                                "images_per_s": round(seen * world / max(1e-9, time.perf_counter() - t0), 1),
                                "lr": lr_at(step - 1, total_steps, cfg.lr, cfg.warmup_frac)})
                epoch, batch_in_epoch = epoch + 1, 0
                sums = torch.zeros(4, dtype=torch.float64)
                if rank == 0:
                    _write_jsonl(checkpoint_path(store, cfg.name, "metrics.jsonl"), history)
                save_state(epoch, 0)
        except Exception:
            if stop.signal is None:
                raise
            # Interrupted while waiting for data (its workers got the signal too): the state
            # after the last whole step is what a resume needs.
            save_state(epoch, batch_in_epoch)
            raise KeyboardInterrupt from None

    # ---- save the final weights and register the model (rank 0 only: one snapshot)
    final = ema.module if ema is not None else model
    check_finite_weights(final)
    record = None
    if rank == 0:
        # The file is named after this run: a concurrent run of the same name never overwrites it.
        run_id = f"train-{uuid.uuid4().hex[:12]}"
        ckpt = checkpoint_path(store, cfg.name, f"model-{run_id[6:]}.safetensors")
        digest = save_weights(final, ckpt)
        metrics = {"epochs": history}
        if cfg.eval_split and R.get("test" if cfg.eval_split == "test" else "_", 1):
            from nsd.engine.models import ModelInfo

            info = ModelInfo(cfg.arch, C, in_chans, size, mean, std, R["class_names"])
            final.eval()
            metrics.setdefault("eval", {})[cfg.eval_split] = evaluate_net(
                store, final, info, R["images_version"], cfg.eval_split, device=device)
        record = {
            "model": cfg.name, "arch": cfg.arch, "num_classes": C, "class_names": R["class_names"],
            "in_chans": in_chans, "image_size": size, "mean": list(mean), "std": list(std),
            "noise": dict(noise, hflip=cfg.hflip), "init": R.get("init"), "selection": R["selection"], "selection_version": R["selection_version"],
            "images_version": R["images_version"], "teacher": R["teacher"], "num_params": num_params,
            "metrics": metrics, "checkpoint": ckpt, "sha256": digest, "created_at": now_utc(),
        }
        reads = {"images": R["images_version"]}
        if student:
            reads["selections"] = R["selection_version"]
        params = {k: v for k, v in asdict(cfg).items() if k != "resolved"}

        def fn(con):
            # Checked again under the store's writers' lock: of two runs with one name, one registers.
            if con.execute("SELECT 1 FROM models WHERE model = ? LIMIT 1", [cfg.name]).fetchone():
                raise UsageError(f"model {cfg.name!r} already exists (registered while this run trained)")
            insert_model_row(con, record)
            return {"models": 1}

        # The row carries its run id, so lineage can find the snapshot that registered it.
        record["run_id"] = run_id
        try:
            commit = store.write("train", params, fn, reads=reads, name=cfg.name, run_id=record["run_id"],
                                 message=f"nsd train {cfg.name} ({cfg.arch}{', student of ' + R['selection'] if student else ''})")
        except UsageError:
            fs, p = fsspec.core.url_to_fs(ckpt)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(p)
            raise
        record["snapshot_id"] = commit.snapshot_id
        # Registered: the resumable state has served its purpose.
        fs, p = fsspec.core.url_to_fs(state_path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p)
    _barrier(world)
    return record


def build_model(store: Store, cfg: TrainConfig, resolved: dict, fresh: bool):
    """The run's timm model with its dropout and drop-path noise, started from pretrained
    weights when asked (timm's hub, a local file, or a model in the store).

    A fresh run records where it started (``resolved["init"]``, stored in `models.init`) and
    the normalisation the weights expect (``mean``/``std``: the pretrained config's, the store
    model's, or 0.5 for a model from scratch), which labeling reuses. A resumed run reads
    both back from its state and gets its weights from there.
    """
    from nsd.engine.models import (file_sha256, load_pretrained, pretrained_normalisation,
                                   read_state_dict)

    noise, in_chans = resolved["noise"], resolved["in_chans"]
    hub = cfg.pretrained and fresh
    model = create_model(cfg.arch, len(resolved["class_names"]), in_chans, drop_rate=noise["drop_rate"],
                         drop_path_rate=noise["drop_path_rate"], pretrained=hub)
    if not fresh:
        resolved.setdefault("mean", [MEAN] * in_chans)  # runs started before normalisation was resolved
        resolved.setdefault("std", [STD] * in_chans)
        return model
    init, mean, std = None, (MEAN,) * in_chans, (STD,) * in_chans
    if hub:
        init = {"pretrained": cfg.arch}
        mean, std = pretrained_normalisation(model, in_chans)
    elif cfg.pretrained_file:
        replaced = load_pretrained(model, read_state_dict(cfg.pretrained_file), cfg.pretrained_file)
        init = {"pretrained_file": cfg.pretrained_file, "sha256": file_sha256(cfg.pretrained_file),
                "head_replaced": replaced}
        mean, std = pretrained_normalisation(model, in_chans)
    elif cfg.init_from:
        source = get_model_record(store, cfg.init_from)
        if source["in_chans"] != in_chans:
            raise UsageError(f"--init-from {cfg.init_from}: it takes {source['in_chans']} channels, "
                             f"these images {in_chans}")
        net, info = load_model(store, cfg.init_from)  # checkpoint verified against its sha256
        replaced = load_pretrained(model, net.state_dict(), f"model {cfg.init_from}")
        init = {"model": cfg.init_from, "sha256": info.sha256, "head_replaced": replaced}
        mean, std = tuple(info.mean), tuple(info.std)
    resolved.update(init=init, mean=list(mean), std=list(std))
    return model


def noisy_student_loss(logits, labels, targets=None, label_smoothing: float = 0.1):
    """The official code's loss: LOGITS holds the labeled batch first (LABELS, class ids), then
    the pseudo-labeled batch (TARGETS, probability rows; None for a teacher).

    Returns (loss, labeled loss, pseudo loss): cross-entropy with label smoothing on the labeled
    rows plus soft cross-entropy on the pseudo-labeled rows, each a mean over its own rows,
    weight 1 each; a part with no rows contributes 0.
    """
    import torch.nn.functional as F

    n_labeled = len(labels)
    zero = logits.sum() * 0  # keeps the graph (and DDP's gradient hooks) when a part is empty
    labeled = F.cross_entropy(logits[:n_labeled], labels, label_smoothing=label_smoothing) if n_labeled else zero
    pseudo = zero
    if targets is not None and len(targets):
        pseudo = (-targets * F.log_softmax(logits[n_labeled:], dim=-1)).sum(-1).mean()
    return labeled + pseudo, labeled, pseudo


class _StopBetweenSteps:
    """Ctrl-C and SIGTERM ask a run to stop after the step in progress: the state it saves is
    then that of whole steps, so a resume is bit-exact (an interruption inside a step used to
    save batch-norm statistics the step had already advanced). Main thread only."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _warn_if_smaller(store, teacher: str, num_params: int) -> None:
    for name in teacher.split(","):
        try:
            t = get_model_record(store, name)
        except UsageError:
            continue
        if t.get("num_params") and num_params < t["num_params"]:
            print(f"warning: student has fewer parameters ({num_params:,}) than its teacher {name} "
                  f"({t['num_params']:,}); Noisy Student wants an equal or larger student", file=sys.stderr)


def _write_jsonl(path: str, rows: list) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- evaluation


def evaluate_net(store: Store, net, info, images_version: int, split: str = "test", *, batch_size: int = 256,
                 device=None) -> dict:
    """Top-1 and per-class accuracy of NET on SPLIT at IMAGES_VERSION, streamed from the store."""
    import torch

    from nsd.engine.transforms import eval_batch

    tune_malloc()
    device = device or next(net.parameters()).device
    C = info.num_classes
    correct = torch.zeros(C, dtype=torch.long)
    total = torch.zeros(C, dtype=torch.long)
    use_amp = device.type == "cuda"
    with store.reader() as con:
        reader = con.execute(
            "SELECT bytes, label FROM images AT (VERSION => ?) WHERE split = ? AND label IS NOT NULL",
            [int(images_version), split]).to_arrow_reader(batch_size)
        for rb in reader:
            data, labels = rb.column(0).to_pylist(), torch.as_tensor(rb.column(1).to_pylist(), dtype=torch.long)
            x = eval_batch(data, info.image_size, info.in_chans, info.mean, info.std).to(device)
            with torch.no_grad(), torch.autocast(device.type, enabled=use_amp):
                pred = net(x).argmax(-1).cpu()
            ok = labels.clamp(0, C - 1)
            total += torch.bincount(ok, minlength=C)
            correct += torch.bincount(ok[pred == labels], minlength=C)
    n = int(total.sum())
    if n == 0:
        raise UsageError(f"no labeled images in split {split!r} at version {images_version}")
    names = list(info.class_names) or [str(c) for c in range(C)]
    return {
        "split": split, "images_version": int(images_version), "n": n,
        "top1": float(correct.sum()) / n,
        "per_class": {names[c]: (float(correct[c]) / int(total[c]) if total[c] else None) for c in range(C)},
    }


def evaluate(store: Store, model: str, split: str = "test", images: str | None = None, *,
             batch_size: int = 256, device: str = "auto", record: bool = True) -> dict:
    """Evaluate a stored model on SPLIT (streamed, eval transform, no noise).

    With ``record`` the result is stored with the model: a new `models` row (same model,
    updated ``metrics.eval[split]``) in one snapshot; `get_model_record` returns the newest row.
    """
    if split not in ("test", "labeled", "unlabeled"):
        raise UsageError(f"unknown split {split!r}: use test, labeled or unlabeled")
    dev = pick_device(device)
    net, info = load_model(store, model)
    net.to(dev)
    version = store.resolve(images)
    result = evaluate_net(store, net, info, version, split, batch_size=batch_size, device=dev)
    if record:
        rec = dict(info.record)
        metrics = dict(rec.get("metrics") or {})
        metrics.setdefault("eval", {})[split] = result
        rec.update(metrics=metrics, created_at=now_utc())

        def fn(con):
            insert_model_row(con, rec)
            return {"models": 1}

        commit = store.write("eval", {"model": model, "split": split, "images": version}, fn,
                             reads={"images": version, "models": store.resolve(None)}, name=model,
                             run_id=None, message=f"nsd eval {model} on {split}: top1 {result['top1']:.4f}")
        result["snapshot_id"] = commit.snapshot_id
        # The new row keeps the training run id; the eval run is in `runs`.
        result["run_id"] = commit.run_id
    result["model"] = model
    return result
