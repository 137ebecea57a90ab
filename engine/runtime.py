"""Process settings shared by the commands that do heavy work: malloc tuning, torchrun, the
device, progress bars.

Malloc (labeling, training, evaluation, balancing):

glibc's malloc hands memory freed by one batch back to the kernel (it trims the heap top and
unmaps large chunks), so the next batch's activations fault every page in again: on 2 cores,
a small CNN at batch 256 spent 40-55 us per image in the kernel and ran ~25% slower (see
bench/results/label.md). Raising the mmap and trim thresholds keeps up to 64 MiB of freed
memory per malloc arena for reuse, which is what tcmalloc or jemalloc users get by default.
"""

from __future__ import annotations

import collections
import ctypes
import datetime as _dt
import multiprocessing
import os
import platform
import re
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from nsd.engine.errors import UsageError

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2), and the free memory
# an arena may keep at its top before trimming.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
# Set to 0 to leave malloc as it is (e.g. to compare, or under another allocator's settings).
ENV = "NSD_MALLOC_TUNE"

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed batch memory for reuse instead of returning it to the kernel (glibc only).

    Called by label, train, eval and balance (the first call decides); a no-op elsewhere, when
    $NSD_MALLOC_TUNE is 0, or when the user set glibc's own malloc variables (theirs win).
    Returns whether the thresholds are now nsd's.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    own = any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")) \
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(ENV, "1") == "0" or own or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return _tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _tuned
    # mallopt returns 1 on success; setting the mmap threshold also stops glibc adjusting it.
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


# --------------------------------------------------------------------------- torchrun


@dataclass
class Dist:
    """This process's place in a torchrun job (WORLD_SIZE > 1); a single process otherwise,
    where every collective is a no-op, so callers never branch on the world size."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this call initialised the process group (close() ends it)

    @classmethod
    def from_env(cls, backend: str | None = None, timeout: _dt.timedelta | None = None) -> "Dist":
        """Join the process group torchrun's variables describe (started once per process).

        BACKEND defaults to nccl with CUDA, gloo without."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as td

        owned = False
        if not td.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            td.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
            owned = True
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def all_reduce(self, tensor) -> None:
        """Sum TENSOR over the ranks, in place."""
        if self.world > 1:
            import torch.distributed as td

            td.all_reduce(tensor)

    def broadcast(self, fn):
        """fn() on rank 0, its result (or its error) on every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as td

        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:
                box[0] = ("err", exc)
        td.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        if self.owned:
            import torch.distributed as td

            td.destroy_process_group()
            self.owned = False


# --------------------------------------------------------------------------- devices


def pick_device(name: str | None = "auto", local_rank: int = 0):
    """The torch device for NAME: ``auto`` (or None) is this rank's GPU when there is one, else
    the CPU; ``cuda`` without an index is this rank's GPU too; ``cpu`` and ``cuda:N`` as given."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


# --------------------------------------------------------------------------- progress


class _NoProgress:
    """What a disabled progress bar is: the same calls, no output."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def start(self):
        pass

    def stop(self):
        pass


def progress_bar(enabled: bool = True, unit: str = "img", fields: tuple[str, ...] = ()):
    """A rich progress bar on stderr, used as a context manager: description, bar, done/total,
    UNIT/s, elapsed time and ETA; a silent stand-in when not ENABLED.

    Descriptions are printed literally (a source path or a model name is never markup).
    FIELDS are format strings over a task's fields shown before the rate (``"loss {loss:.4f}"``);
    a task's ``rate`` field, when given, replaces rich's own items/s (training counts images
    while its bar counts steps).
    """
    if not enabled:
        return _NoProgress()
    class Fields(ProgressColumn):
        def __init__(self, template: str):
            super().__init__()
            self.template = template

        def render(self, task):
            try:
                return Text(self.template.format(**task.fields))
            except (KeyError, ValueError, TypeError):
                return Text("")

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.fields.get("rate", task.speed)
            return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")

    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                    MofNCompleteColumn(), *(Fields(f) for f in fields), Rate(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))


# --------------------------------------------------------------------------- processes


def ordered_map(fn: Callable, items: Iterable, workers: int, *args) -> Iterator[tuple]:
    """(item, fn(item, *args)) for every item, in order, computed by WORKERS processes with at
    most two items per worker in flight: memory stays bounded however long ITEMS is (a
    Pool.imap would read all of ITEMS ahead). FN and its arguments are plain data."""
    if workers <= 1:
        for item in items:
            yield item, fn(item, *args)
        return

    # fork: workers start instantly and need no re-import (they run PIL, hashlib, numpy).
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with ctx.Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.apply_async(fn, (item, *args))))
            if len(pending) >= 2 * workers:
                done, job = pending.popleft()
                yield done, job.get()
        while pending:
            done, job = pending.popleft()
            yield done, job.get()



def host_name() -> str:
    """This host's name as it appears in file names (staging directories, heartbeats)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OverflowError:
        return False
    return True
