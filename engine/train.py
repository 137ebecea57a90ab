"""Training a teacher or a noised student from the store, and evaluating models.

``train(store, TrainConfig(...))`` reads one pinned snapshot, streams batches (engine/stream),
and registers the result as one `models` row in one snapshot. ``train()`` reads top to bottom:
start or resume -> model, optimiser, EMA -> data -> the epochs of steps -> register.

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
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import fsspec

from nsd.engine.errors import UsageError
from nsd.engine.guards import check_finite_loss, check_finite_weights
from nsd.engine.models import (ModelInfo, checkpoint_path, count_params, create_model, file_sha256,
                               get_model_record, has_model, insert_model_row, load_model, load_pretrained,
                               model_exists, model_metrics, path_exists, pretrained_normalisation,
                               read_state_dict, save_weights)
from nsd.engine.params import MAX_BATCH, MAX_EPOCHS, MAX_STEPS, MAX_WORKERS, SPLITS, check_options, option
from nsd.engine.paths import write_url
from nsd.engine.runtime import Dist, pick_device, progress_bar, tune_malloc
from nsd.engine.store import Store, check_name, name_literal, now_utc
from nsd.engine import stream
from nsd.engine.stream import MEAN, STD, data_facts
from nsd.engine.transforms import NOISE_DEFAULTS, NOISE_RANGES, check_noise, eval_batch, train_transform

def _noise(key: str, help: str) -> dict:
    """The declaration of a noise setting: its range in NOISE_RANGES, its default in NOISE_DEFAULTS."""
    low, high, closed = NOISE_RANGES[key]
    return dict(help=help, low=low, high=high, open="" if closed else "high",
                whole=isinstance(NOISE_DEFAULTS[key], int), shown=NOISE_DEFAULTS[key])


@dataclass
class TrainConfig:
    """One training run (``nsd train``'s options, declared once: the CLI builds its options from
    these declarations, ``nsd loop`` takes them too, and ``check_options`` checks a caller's)."""

    name: str = option(help="Name of the model in the store.")
    arch: str = option(name="--model", help="A timm architecture name, e.g. resnet18, test_resnet "
                                            "(local weights: --pretrained-file).")
    selection: str | None = option(None, "NAME[@REF]: train a student on labeled + this selection.")
    images: str | None = option(None, "Store version of the images (default: latest at the start).", metavar="REF")
    epochs: int = option(10, "Passes over the labeled split, for a teacher and a student alike "
                             "(a student's selection cycles alongside).", low=1, high=MAX_EPOCHS, whole=True)
    steps: int | None = option(None, "Train for exactly this many steps instead (fixed budgets across runs).",
                               low=1, high=MAX_STEPS, whole=True)
    batch_size: int = option(64, "Labeled batch B.", low=1, high=MAX_BATCH, whole=True)
    unlabeled_ratio: int = option(3, "Pseudo-labeled batch is R x B.", low=1, high=1024, whole=True)
    lr: float = option(2e-3, "Peak learning rate (AdamW, warmup then cosine).", low=0, high=10, open="low",
                       guarded=True)
    weight_decay: float = option(0.05, "AdamW weight decay.", low=0, high=10)
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1
    seed: int = option(0, "Seed of the weights, the noise and the data order.", low=0, high=2**32 - 1, whole=True)
    image_size: int | None = option(None, "Default: the images' own size.", low=4, high=4096, whole=True)
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    workers: int = option(2, "DataLoader workers.", low=0, high=MAX_WORKERS, whole=True)
    noise: bool | None = option(None, "All noise (RandAugment, dropout, stochastic depth, random erasing) "
                                      "on/off [default: on, for teachers and students].", flag="--noise/--no-noise")
    randaug_n: int | None = option(None, **_noise("randaug_n", "RandAugment ops per image (0: off)."))
    randaug_m: float | None = option(None, **_noise("randaug_m", "RandAugment magnitude (0-30)."))
    drop_rate: float | None = option(None, **_noise("drop_rate", "Dropout before the classifier."))
    drop_path_rate: float | None = option(None, **_noise("drop_path_rate", "Stochastic depth."))
    random_erasing: float | None = option(None, **_noise("random_erasing", "Random erasing probability."))
    hflip: float = option(0.5, "Horizontal flip probability of the training crop (0 for digits or text).",
                          low=0, high=1)
    ema: float | None = option(None, "Keep EMA weights with this decay and register them.",
                               low=0, high=1, open="both")
    pretrained: bool = option(False, "Start from timm's pretrained weights for the architecture "
                                     "(downloaded from its hub).", flag="--pretrained")
    pretrained_file: str | None = option(None, "Start from these weights (safetensors or a weights-only state "
                                               "dict; a new head when the classes differ).", metavar="FILE")
    init_from: str | None = option(None, "Start from the weights of a model in the store.", metavar="MODEL")
    eval_split: str | None = option("test", "Evaluate on this split at the end ('' to skip).")
    save_every: int = option(0, "Also save the resumable state every N steps (default: at an epoch's end "
                                "once 200 steps passed).", low=0, high=MAX_STEPS, whole=True)
    progress: bool = option(True, "No progress bar.", flag="--no-progress")


@dataclass
class ResolvedRun:
    """What a run trains on, pinned once at its start and kept in its resumable state, so a
    resumed run reads the same snapshot with the same settings."""

    images_version: int
    class_names: list[str]
    in_chans: int                         # 1 for grey images, 3 for anything with colour
    width: int                            # the images' most common width
    labeled: int                          # labeled images at images_version
    test: int                             # test images at images_version
    image_size: int
    noise: dict                           # resolve_noise()
    selection: str | None = None          # a student's selection; None for a teacher
    selection_version: int | None = None
    selection_rows: int | None = None
    teacher: str | None = None            # the teacher(s) whose labels the selection holds
    init: dict | None = None              # where the weights started (build_model sets it)
    mean: list[float] | None = None       # the normalisation the weights expect (build_model)
    std: list[float] | None = None

    @property
    def student(self) -> bool:
        return self.selection is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_state(cls, saved: dict) -> "ResolvedRun":
        """The record as a resumable state holds it (a plain dict: states load weights-only)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


# --------------------------------------------------------------------------- start or resume


def check_sizes(cfg: TrainConfig) -> None:
    """A usage error for a setting outside its declared range (None: not set). The learning
    rate's upper bound is the CLI's; the divergence guard (engine/guards.py) watches the rest."""
    check_options(cfg)


def resolve_noise(cfg: TrainConfig) -> dict:
    """The noise a run uses: the defaults unless ``--no-noise``, which turns every kind off;
    explicit values win otherwise. Teacher and student alike (the paper's teacher is trained
    with noise too; it labels without it)."""
    out = {}
    for key, default in NOISE_DEFAULTS.items():
        given = getattr(cfg, key)
        if cfg.noise is False and key != "randaug_m":  # M is a magnitude, not a switch: N=0 is off
            out[key] = 0
        else:
            out[key] = given if given is not None else default
    out["randaug_n"] = int(out["randaug_n"])
    for key in ("randaug_m", "drop_rate", "drop_path_rate", "random_erasing"):
        out[key] = float(out[key])
    return check_noise(out)


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
    return {"selection_rows": int(n), "teacher": ",".join(teachers) or None}


def resolve_run(store: Store, cfg: TrainConfig) -> ResolvedRun:
    """Pin versions and facts once at start (kept in the resumable state)."""
    check_name(cfg.name, "model name")
    latest = store.resolve(None)
    images_version = store.resolve(cfg.images) if cfg.images else latest
    selection = {}
    if cfg.selection:
        name, _, ref = cfg.selection.partition("@")
        check_name(name, "selection")
        selection = {"selection": name, "selection_version": store.resolve(ref) if ref else latest}
        selection.update(_selection_facts(store, name, selection["selection_version"]))
    facts = data_facts(store, images_version)
    if facts["labeled"] == 0 and not cfg.selection:
        raise UsageError(f"no labeled images at version {images_version}: nothing to train a teacher on")
    check_sizes(cfg)
    noise = resolve_noise(cfg)
    if sum(map(bool, (cfg.pretrained, cfg.pretrained_file, cfg.init_from))) > 1:
        raise UsageError("use one of --pretrained, --pretrained-file and --init-from")
    return ResolvedRun(images_version=images_version, **facts, image_size=int(cfg.image_size or facts["width"]),
                       noise=noise, **selection)


def start_or_resume(store: Store, cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, ResolvedRun, dict | None]:
    """The run's settings, its pinned facts and, when resuming, its saved state: a new run
    resolves them now, a resumed one reads all three back from its state."""
    state_path = _state_path(store, cfg.name)
    if resume:
        if not path_exists(state_path):
            raise UsageError(f"nothing to resume: no training state for {cfg.name!r} at {state_path}")
        state = _load_state(state_path)
        saved = state["config"]
        cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
        if model_exists(store, cfg.name):
            raise UsageError(f"model {cfg.name!r} already finished and is registered")
        return cfg, ResolvedRun.from_state(saved["resolved"]), state
    if model_exists(store, cfg.name):
        raise UsageError(f"model {cfg.name!r} already exists; pick another --name")
    if path_exists(state_path):
        raise UsageError(f"an unfinished run named {cfg.name!r} exists; continue it with --resume")
    return cfg, resolve_run(store, cfg), None


# An epoch's end saves the resumable state once this many steps passed since the last save
# (and after the last epoch): a kill loses at most this many steps (--save-every: fewer).
STATE_EVERY_STEPS = 200


def _state_path(store, name):
    return checkpoint_path(store, name, "train_state.pt")


def has_saved_state(store: Store, name: str) -> bool:
    """Whether an interrupted run NAME left a resumable state."""
    return path_exists(_state_path(store, name))


def _save_state(path: str, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    write_url(path, buf.getvalue())  # whole or absent, whoever else writes a state of this name


def _load_state(path: str) -> dict:
    import torch

    with fsspec.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- model, optimiser, EMA


@dataclass
class Trainee:
    """The model being trained and what updates it: the parts a resumable state saves."""

    model: Any             # the module whose weights are saved
    net: Any               # what runs the forward pass: the model, or DDP around it
    optimizer: Any
    scaler: Any            # float16 loss scaling on CUDA without bfloat16; a no-op otherwise
    device: Any
    amp_dtype: Any         # autocast's dtype, used on CUDA only
    ema: Any = None        # EMA weights (registered instead of the model's) when cfg.ema

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def final(self):
        """The weights a finished run registers."""
        return self.ema.module if self.ema is not None else self.model


def train_device(name: str, dist: Dist):
    """The run's device; under torchrun each rank trains on its own GPU (its local rank)."""
    import torch

    device = pick_device(name, dist.local_rank)
    if device.type == "cuda":
        if dist.world > 1:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def build_trainee(store: Store, cfg: TrainConfig, run: ResolvedRun, state: dict | None, device,
                  dist: Dist) -> Trainee:
    """Model (the same init on every rank; DDP also broadcasts it), AdamW, EMA and loss scaler,
    restored from STATE when resuming."""
    import torch

    torch.manual_seed(cfg.seed)
    model = build_model(store, cfg, run, fresh=state is None).to(device)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if cuda else None)
    return Trainee(model, net, optimizer, scaler, device, amp_dtype, ema)


# --------------------------------------------------------------------------- data


@dataclass
class Position:
    """How far a run is: besides the weights, what its resumable state records."""

    epoch: int = 0
    batch: int = 0         # batches done in the current epoch
    step: int = 0          # optimiser steps done
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    sums: Any = None       # this epoch's loss, labeled loss, pseudo loss and steps (float64)

    @classmethod
    def restore(cls, state: dict | None, rank: int) -> "Position":
        import torch

        pos = cls(sums=torch.zeros(4, dtype=torch.float64))
        if state is not None:
            pos.epoch, pos.batch, pos.step = state["epoch"], state["batch"], state["step"]
            pos.history = json.loads(state["history"])
            if state.get("sums") is not None and rank == 0:  # other ranks' part of the sums is lost
                pos.sums = state["sums"].clone()
        return pos


@dataclass
class TrainData:
    """What the steps read, and how many there are."""

    batches: Iterator          # a teacher's labeled batches, a student's pseudo-labeled ones
                               # (cycling across epochs: step s uses batch s)
    labeled: Iterator | None   # a student's labeled batches (cycling the same way)
    steps_per_epoch: int
    total_steps: int
    num_epochs: int


def stream_data(store: Store, cfg: TrainConfig, run: ResolvedRun, stage: Path, pos: Position, device,
                dist: Dist) -> TrainData:
    """Stage the plans of the pinned snapshot and start the batch streams where POS is."""
    import torch


    labeled_plan = stream.stage_split(store, run.images_version, "labeled", stage, cfg.seed, run.num_classes)
    pseudo_plan = (stream.stage_selection(store, run.selection, run.selection_version, run.images_version,
                                          stage, cfg.seed, run.num_classes) if run.student else None)
    noise = run.noise
    transform = train_transform(run.image_size, tuple(run.mean), tuple(run.std), noise["randaug_n"],
                                noise["randaug_m"], run.in_chans, hflip=cfg.hflip,
                                random_erasing=noise["random_erasing"])
    labeled_batch = cfg.batch_size
    # An epoch is one pass over the labeled split, for a teacher and a student alike, so a
    # budget in epochs means the same for both and a selection's size never changes it. Only a
    # student with no labeled images at all counts passes over its selection.
    by_labeled = labeled_plan.num_rows > 0
    steps_per_epoch = (stream.batches_per_epoch(labeled_plan, labeled_batch, dist.world) if by_labeled else
                       stream.batches_per_epoch(pseudo_plan, labeled_batch * cfg.unlabeled_ratio, dist.world))
    if steps_per_epoch == 0 or (run.student and pseudo_plan.num_rows == 0):
        raise UsageError("the training set is empty")
    # A step budget (--steps) runs whole epochs and stops mid-way through the last one.
    total_steps = cfg.steps or steps_per_epoch * cfg.epochs

    def loader(plan, batch_size, skip, seed):
        ds = stream.StoreStream(plan, batch_size, transform, in_chans=run.in_chans, seed=seed,
                                skip_batches=skip, rank=dist.rank, world_size=dist.world, cycle=True,
                                image_size=run.image_size)
        return iter(torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if cfg.workers else None))

    # One loader per stream for the whole run: each runs on from epoch to epoch (cycling; step s
    # reads batch s), so DataLoader workers start once, not once per epoch (a teacher on 1,000
    # labels has 16 steps an epoch: restarting workers cost more than the steps).
    if not run.student:
        return TrainData(loader(labeled_plan, labeled_batch, pos.step, cfg.seed), None, steps_per_epoch,
                         total_steps, math.ceil(total_steps / steps_per_epoch))
    batches = loader(pseudo_plan, labeled_batch * cfg.unlabeled_ratio, pos.step, cfg.seed)
    labeled = loader(labeled_plan, labeled_batch, pos.step, cfg.seed + 1) if by_labeled else None
    return TrainData(batches, labeled, steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))


# --------------------------------------------------------------------------- the step


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def lr_at(step: int, total: int, lr: float, warmup_frac: float) -> float:
    """Linear warmup, then cosine decay to 0 (a function of the step: nothing to checkpoint)."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _step_inputs(batch: dict, labeled_batches: Iterator | None, student: bool, device):
    """The step's images (a student's labeled batch first, then its pseudo-labeled one), the
    labeled images' class ids, and a student's soft targets (None for a teacher)."""
    import torch

    if not student:
        return batch["x"].to(device, non_blocking=True), batch["y"].to(device), None
    targets = batch["y"].to(device)
    labeled = next(labeled_batches) if labeled_batches is not None else None
    if labeled is None:  # a student with no labeled images at all
        labeled = {"x": batch["x"][:0], "y": torch.zeros(0, dtype=torch.long)}
    images = torch.cat([labeled["x"], batch["x"]]).to(device, non_blocking=True)
    return images, labeled["y"].to(device), targets


def train_step(cfg: TrainConfig, run: ResolvedRun, trainee: Trainee, batch: dict, data: TrainData,
               step: int, rank: int):
    """One optimiser step on BATCH. Returns (loss, labeled loss, pseudo loss) and the number
    of images it took."""
    import torch

    # Per-step seed: dropout/drop-path noise is reproducible on resume.
    torch.manual_seed(_step_seed(cfg.seed, step, rank))
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr_at(step, data.total_steps, cfg.lr, cfg.warmup_frac)
    # One forward pass over the labeled batch, then the pseudo-labeled one.
    images, labels, targets = _step_inputs(batch, data.labeled, run.student, trainee.device)
    with torch.autocast(trainee.device.type, dtype=trainee.amp_dtype, enabled=trainee.use_amp):
        logits = trainee.net(images).float()
    losses = noisy_student_loss(logits, labels, targets, cfg.label_smoothing)
    check_finite_loss(losses[0], step)
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.scaler.scale(losses[0]).backward()
    trainee.scaler.step(trainee.optimizer)
    trainee.scaler.update()
    if trainee.ema is not None:
        trainee.ema.update(trainee.model, step=step)
    return losses, len(images)


# --------------------------------------------------------------------------- training


def train(store: Store, cfg: TrainConfig, resume: bool = False, stop_after_steps: int | None = None) -> dict | None:
    """Train NAME and register it in `models` (one snapshot). Returns the registered record.

    With ``resume`` the run continues from checkpoints/NAME/train_state.pt with the settings and
    pinned versions saved there. ``stop_after_steps`` saves the training state after that many
    steps and returns None (what an interruption does), for tests and time-boxed jobs.
    """
    store.require()
    check_name(cfg.name, "model name")
    tune_malloc()
    dist = Dist.from_env()
    cfg, run, state = start_or_resume(store, cfg, resume)
    device = train_device(cfg.device, dist)
    trainee = build_trainee(store, cfg, run, state, device, dist)
    if run.student and run.teacher and dist.rank == 0 and state is None:
        _warn_if_smaller(store, run.teacher, count_params(trainee.model))
    pos = Position.restore(state, dist.rank)

    def save():
        if dist.rank == 0:
            _save_state(_state_path(store, cfg.name), _state(cfg, run, trainee, pos))
        dist.barrier()

    with store.staging("train") as stage, contextlib.ExitStack() as stack:
        data = stream_data(store, cfg, run, Path(stage) / f"rank{dist.rank}", pos, device, dist)
        if dist.rank == 0 and state is None and run.init is None:  # weights from elsewhere train on
            _warn_if_starved(run.noise, data.total_steps)
        bar = stack.enter_context(progress_bar(cfg.progress and dist.rank == 0, fields=("loss {loss:.4f}",)))
        # After the loaders started: their workers keep the default handlers.
        stop = stack.enter_context(_StopBetweenSteps())
        try:
            if not run_epochs(store, cfg, run, trainee, data, pos, dist, bar, stop, save, stop_after_steps):
                return None
        except Exception:
            if stop.signal is None:
                raise
            # Interrupted while waiting for data (its workers got the signal too): the state
            # after the last whole step is what a resume needs.
            save()
            raise KeyboardInterrupt from None

    check_finite_weights(trainee.final)
    record = register(store, cfg, run, trainee, pos.history) if dist.rank == 0 else None
    dist.barrier()
    return record


def run_epochs(store: Store, cfg: TrainConfig, run: ResolvedRun, trainee: Trainee, data: TrainData,
               pos: Position, dist: Dist, bar, stop, save, stop_after_steps: int | None) -> bool:
    """Step until the run's last step, saving the state as asked; False when it stopped early
    (``stop_after_steps``). Ctrl-C or SIGTERM (STOP) ends it after the step in progress."""
    import torch

    saved_at = pos.step
    while pos.epoch < data.num_epochs:
        trainee.net.train()
        epoch_steps = min(data.steps_per_epoch, data.total_steps - pos.epoch * data.steps_per_epoch)
        task = bar.add_task(f"{cfg.name} epoch {pos.epoch + 1}/{data.num_epochs}", total=epoch_steps,
                            completed=pos.batch, loss=float("nan"))
        started, seen = time.perf_counter(), 0
        for batch in itertools.islice(data.batches, max(0, epoch_steps - pos.batch)):
            if pos.step >= data.total_steps:
                break
            losses, images = train_step(cfg, run, trainee, batch, data, pos.step, dist.rank)
            pos.step, pos.batch, seen = pos.step + 1, pos.batch + 1, seen + images
            pos.sums += torch.tensor([*(loss.item() for loss in losses), 1.0], dtype=torch.float64)
            bar.update(task, advance=1, loss=losses[0].item(),
                       rate=seen * dist.world / max(1e-9, time.perf_counter() - started))
            if cfg.save_every and pos.step % cfg.save_every == 0:
                save()
            if stop_after_steps is not None and pos.step >= stop_after_steps:
                save()
                return False
            if stop.signal is not None:  # Ctrl-C / SIGTERM: stop here, between two steps
                save()
                raise KeyboardInterrupt
        _end_epoch(store, cfg, data, pos, dist, seen * dist.world / max(1e-9, time.perf_counter() - started))
        # Not after every epoch: with 10 labels per class an epoch is 2 steps, and writing the
        # whole state each time cost more than the steps. Decided by steps, the same on every rank.
        if pos.step - saved_at >= STATE_EVERY_STEPS or pos.epoch == data.num_epochs:
            save()
            saved_at = pos.step
    return True


def _end_epoch(store: Store, cfg: TrainConfig, data: TrainData, pos: Position, dist: Dist, rate: float) -> None:
    """The epoch's metrics row (means over all ranks' steps; RATE: images/s of all ranks),
    written to metrics.jsonl."""
    import torch

    dist.all_reduce(pos.sums)
    loss, labeled_loss, pseudo_loss, steps = pos.sums.tolist()
    steps = max(1.0, steps)
    pos.history.append({"epoch": pos.epoch + 1, "steps": pos.step, "loss": loss / steps,
                        "labeled_loss": labeled_loss / steps, "pseudo_loss": pseudo_loss / steps,
                        "images_per_s": round(rate, 1),
                        "lr": lr_at(pos.step - 1, data.total_steps, cfg.lr, cfg.warmup_frac)})
    pos.epoch, pos.batch = pos.epoch + 1, 0
    pos.sums = torch.zeros(4, dtype=torch.float64)
    if dist.rank == 0:
        _write_jsonl(checkpoint_path(store, cfg.name, "metrics.jsonl"), pos.history)


def _state(cfg: TrainConfig, run: ResolvedRun, trainee: Trainee, pos: Position) -> dict:
    """The resumable state: plain values and tensors only (it loads weights-only)."""
    import torch

    return {"config": dict(asdict(cfg), resolved=asdict(run)), "model": trainee.model.state_dict(),
            "optimizer": trainee.optimizer.state_dict(),
            "ema": trainee.ema.state_dict() if trainee.ema is not None else None,
            "scaler": trainee.scaler.state_dict(), "epoch": pos.epoch, "batch": pos.batch, "step": pos.step,
            "history": json.dumps(pos.history),
            "sums": pos.sums if pos.batch else torch.zeros(4, dtype=torch.float64)}


# --------------------------------------------------------------------------- register


def register(store: Store, cfg: TrainConfig, run: ResolvedRun, trainee: Trainee, history: list) -> dict:
    """Save the final weights, evaluate them, and register the model: one `models` row in one
    snapshot (rank 0 only). Returns the row with its snapshot id."""
    final = trainee.final
    # The file is named after this run: a concurrent run of the same name never overwrites it.
    run_id = f"train-{uuid.uuid4().hex[:12]}"
    ckpt = checkpoint_path(store, cfg.name, f"model-{run_id[6:]}.safetensors")
    digest = save_weights(final, ckpt)
    metrics = {"epochs": history}
    if cfg.eval_split and (cfg.eval_split != "test" or run.test):
        info = ModelInfo(cfg.arch, run.num_classes, run.in_chans, run.image_size, tuple(run.mean),
                         tuple(run.std), run.class_names)
        final.eval()
        metrics["eval"] = {cfg.eval_split: evaluate_net(store, final, info, run.images_version, cfg.eval_split,
                                                        device=trainee.device)}
    record = {
        "model": cfg.name, "arch": cfg.arch, "num_classes": run.num_classes, "class_names": run.class_names,
        "in_chans": run.in_chans, "image_size": run.image_size, "mean": list(run.mean), "std": list(run.std),
        "noise": dict(run.noise, hflip=cfg.hflip), "init": run.init, "selection": run.selection,
        "selection_version": run.selection_version, "images_version": run.images_version,
        "teacher": run.teacher, "num_params": count_params(trainee.model), "metrics": metrics,
        "checkpoint": ckpt, "sha256": digest, "created_at": now_utc(),
    }
    reads = {"images": run.images_version}
    if run.student:
        reads["selections"] = run.selection_version

    def fn(con):
        # Checked again under the store's writers' lock: of two runs with one name, one registers.
        if has_model(con, cfg.name):
            raise UsageError(f"model {cfg.name!r} already exists (registered while this run trained)")
        insert_model_row(con, dict(record, checkpoint=store.relative_path(ckpt)))
        return {"models": 1}

    # The row carries its run id, so lineage can find the snapshot that registered it.
    record["run_id"] = run_id
    try:
        commit = store.write("train", asdict(cfg), fn, reads=reads, name=cfg.name, run_id=run_id,
                             message=f"nsd train {cfg.name} ({cfg.arch}"
                                     f"{', student of ' + run.selection if run.student else ''})")
    except UsageError:
        _remove(ckpt)
        raise
    record["snapshot_id"] = commit.snapshot_id
    _remove(_state_path(store, cfg.name))  # registered: the resumable state has served its purpose
    return record


def _remove(path: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p)


def build_model(store: Store, cfg: TrainConfig, run: ResolvedRun, fresh: bool):
    """The run's timm model with its dropout and drop-path noise, started from pretrained
    weights when asked (timm's hub, a local file, or a model in the store).

    A fresh run records where it started (``run.init``, stored in `models.init`) and
    the normalisation the weights expect (``mean``/``std``: the pretrained config's, the store
    model's, or 0.5 for a model from scratch), which labeling reuses. A resumed run reads
    both back from its state and gets its weights from there.
    """
    noise, in_chans = run.noise, run.in_chans
    hub = cfg.pretrained and fresh
    model = create_model(cfg.arch, run.num_classes, in_chans, drop_rate=noise["drop_rate"],
                         drop_path_rate=noise["drop_path_rate"], pretrained=hub)
    if not fresh:
        if run.mean is None:  # runs started before normalisation was resolved
            run.mean, run.std = [MEAN] * in_chans, [STD] * in_chans
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
    run.init, run.mean, run.std = init, list(mean), list(std)
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

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# Below this many steps noise costs accuracy instead of adding it (test_resnet, Fashion-MNIST,
# 1,000 labels: noised minus plain was -2.2 points at 960 steps, +0.5 at 2,400; issue 27).
MIN_NOISED_STEPS = 2000


def _warn_if_starved(noise: dict, total_steps: int) -> None:
    noised = noise["randaug_n"] or noise["drop_rate"] or noise["drop_path_rate"] or noise["random_erasing"]
    if noised and total_steps < MIN_NOISED_STEPS:
        print(f"warning: {total_steps:,} steps is too few for noised training (noise pays from about "
              f"{MIN_NOISED_STEPS:,} steps): give more --epochs or --steps, or --no-noise", file=sys.stderr)


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
    write_url(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


# --------------------------------------------------------------------------- evaluation


def evaluate_net(store: Store, net, info, images_version: int, split: str = "test", *, batch_size: int = 256,
                 device=None) -> dict:
    """Top-1 and per-class accuracy of NET on SPLIT at IMAGES_VERSION, streamed from the store."""
    import torch


    tune_malloc()
    device = device or next(net.parameters()).device
    num_classes = info.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
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
            ok = labels.clamp(0, num_classes - 1)
            total += torch.bincount(ok, minlength=num_classes)
            correct += torch.bincount(ok[pred == labels], minlength=num_classes)
    n = int(total.sum())
    if n == 0:
        raise UsageError(f"no labeled images in split {split!r} at version {images_version}")
    names = list(info.class_names) or [str(c) for c in range(num_classes)]
    return {
        "split": split, "images_version": int(images_version), "n": n,
        "top1": float(correct.sum()) / n,
        "per_class": {names[c]: (float(correct[c]) / int(total[c]) if total[c] else None)
                      for c in range(num_classes)},
    }


def evaluate(store: Store, model: str, split: str = "test", images: str | None = None, *,
             batch_size: int = 256, device: str = "auto", record: bool = True) -> dict:
    """Evaluate a stored model on SPLIT (streamed, eval transform, no noise).

    With ``record`` the result is stored with the model in one snapshot: its `models` row gets
    ``metrics.eval[split]`` updated in place (one row per model; earlier results stay readable
    at earlier snapshots, and every eval is a run in `runs`).
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    dev = pick_device(device)
    net, info = load_model(store, model)
    net.to(dev)
    version = store.resolve(images)
    result = evaluate_net(store, net, info, version, split, batch_size=batch_size, device=dev)
    if record:
        def fn(con):
            # read and written under the writers' lock: two evals of one model both land
            metrics = model_metrics(con, model)
            metrics.setdefault("eval", {})[split] = result
            con.execute("UPDATE models SET metrics = ? WHERE model = ?", [json.dumps(metrics, sort_keys=True), model])
            return {"models": 1}

        commit = store.write("eval", {"model": model, "split": split, "images": version}, fn,
                             reads={"images": version, "models": store.resolve(None)}, name=model,
                             run_id=None, message=f"nsd eval {model} on {split}: top1 {result['top1']:.4f}")
        result["snapshot_id"] = commit.snapshot_id
        result["run_id"] = commit.run_id  # the eval's run; the row keeps the training run id
    result["model"] = model
    return result
