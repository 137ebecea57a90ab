"""Benchmark: `nsd train` (a noised student streaming from the store) vs a bare PyTorch loop over
images decoded in RAM, same model, batches, noise, optimiser and DataLoader workers.

    .venv/bin/python bench/train.py --steps 150 --repeats 3

Both sides train ``test_resnet`` (10 classes, 1 channel, 28x28) on a joint batch of B labeled +
R*B pseudo-labeled images (64 + 192) with the student noise (crop + flip, RandAugment 2/9,
random erasing 0.25, dropout 0.2, drop-path 0.1), AdamW and the same loss function
(``noisy_student_loss``), one thread count, W DataLoader workers per stream.

* nsd: ``nsd.engine.train.train()`` on a selection of the store: pin versions, stage plans of
  the labeled images and of the selection, stream PNG bytes from them, decode and augment in the
  workers, train, save, register (one snapshot). "loop" is its own images/s of the training loop
  (the `images_per_s` of its metrics: workers' start included, as on the bare side); "command"
  is the wall time of ``nsd train`` as a user runs it (interpreter start, imports, staging,
  registering).
* bare: the images decoded beforehand into PIL images held in two Python lists (decode not
  counted), map-style datasets with ``shuffle=True``, the same augmentation written with
  torchvision and timm's classes (``plain_transform``: nsd's transform gives the same values
  bit for bit, faster) and the same loss. Its "loop" is timed the same way
  (from the first batch asked for to the last step), its "command" adds model creation and the
  decode.

Sides alternate (nsd bare, bare nsd, ...), each in a fresh process; medians are quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
sys.path.insert(0, str(ROOT / "bench"))

ARCH, CLASSES, SIZE = "test_resnet", 10, 28
NOISE = {"randaug_n": 2, "randaug_m": 9.0, "drop_rate": 0.2, "drop_path_rate": 0.1, "random_erasing": 0.25}


def store_path(labeled: int, unlabeled: int) -> Path:
    return WORK / f"train-{labeled}-{unlabeled}"


def make_store(labeled: int, unlabeled: int) -> Path:
    """LABELED + UNLABELED synthetic images and a selection `pool` of the unlabeled ones (one-hot targets)."""
    from stream import make_store as make_stream_store

    path = store_path(labeled, unlabeled)
    if not (path / "ready").exists():
        shutil.rmtree(path, ignore_errors=True)
        make_stream_store(path, labeled, unlabeled)
        (path / "ready").touch()
    return path


def run_nsd(path: str, steps: int, batch: int, ratio: int, workers: int) -> dict:
    from nsd.engine.store import Store
    from nsd.engine.train import TrainConfig, train

    name = f"bench-{os.getpid()}-{time.time_ns()}"
    t0 = time.perf_counter()
    record = train(Store(path), TrainConfig(
        name=name, arch=ARCH, selection="pool", steps=steps, batch_size=batch, unlabeled_ratio=ratio,
        workers=workers, progress=False, eval_split=None, **NOISE))
    seconds = time.perf_counter() - t0
    epochs = record["metrics"]["epochs"]
    if len(epochs) != 1:
        raise SystemExit("the benchmark's steps must fit in one epoch of the selection")
    return {"loop_ips": epochs[0]["images_per_s"], "call_s": seconds, "steps": epochs[0]["steps"]}


def plain_transform():
    """The student noise as a plain loop writes it with torchvision and timm: reflect-padded
    random crop, flip, RandAugment 2/9 (nsd's, for its M scale), ToTensor, Normalize, random
    erasing. nsd's train_transform gives the same values bit for bit (tests/test_transforms.py)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    from nsd.engine.transforms import randaugment

    _, _, final = create_transform(SIZE, is_training=True, separate=True, hflip=0.5, mean=(0.5,), std=(0.5,),
                                   color_jitter=None, re_prob=NOISE["random_erasing"], re_mode="pixel")
    return T.Compose([T.RandomCrop(SIZE, padding=SIZE // 8, padding_mode="reflect"), T.RandomHorizontalFlip(0.5),
                      randaugment(NOISE["randaug_n"], NOISE["randaug_m"], 1, SIZE, (0.5,)), *final.transforms])


def run_bare(path: str, steps: int, batch: int, ratio: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from nsd.engine.runtime import tune_malloc
    from nsd.engine.store import Store
    from nsd.engine.train import lr_at, noisy_student_loss
    from nsd.engine.transforms import decode
    import timm

    tune_malloc()  # nsd's process has it: the same allocator behaviour on both sides
    t_start = time.perf_counter()
    with Store(path).reader() as con:
        lab = con.execute("SELECT bytes, label FROM images WHERE split = 'labeled' ORDER BY image_id").fetchall()
        pse = con.execute("SELECT i.bytes, s.target FROM selections s JOIN images i USING (image_id) "
                          "WHERE s.selection = 'pool' ORDER BY image_id").fetchall()
    labeled = [(decode(b, 1), y) for b, y in lab]
    pseudo = [(decode(b, 1), torch.tensor(t, dtype=torch.float32)) for b, t in pse]
    decode_s = time.perf_counter() - t_start
    tf = plain_transform()

    class Images(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            image, y = self.items[i]
            return tf(image), y

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=CLASSES, in_chans=1, drop_rate=NOISE["drop_rate"],
                              drop_path_rate=NOISE["drop_path_rate"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)

    def forever(items, bs):
        loader = DataLoader(Images(items), batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                            prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
        while True:
            yield from loader

    model.train()
    t0, seen = time.perf_counter(), 0
    lab_iter, pse_iter = forever(labeled, batch), forever(pseudo, batch * ratio)
    for step in range(steps):
        (xl, yl), (xu, tu) = next(lab_iter), next(pse_iter)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 0.05)
        x = torch.cat([xl, xu])
        loss, _, _ = noisy_student_loss(model(x).float(), yl, tu, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(x)
    loop_s = time.perf_counter() - t0
    return {"loop_ips": seen / loop_s, "call_s": time.perf_counter() - t_start, "decode_s": decode_s, "steps": steps}


def nsd_command(path: str, steps: int, batch: int, ratio: int, workers: int) -> float:
    """Wall seconds of `nsd train` as a user types it."""
    nsd = Path(sys.executable).parent / "nsd"
    argv = [str(nsd), "--store", path, "train", "--name", f"cmd-{time.time_ns()}", "--model", ARCH,
            "--selection", "pool", "--steps", str(steps), "--batch-size", str(batch),
            "--unlabeled-ratio", str(ratio), "--workers", str(workers), "--eval-split", ""]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"nsd train failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labeled", type=int, default=2000)
    ap.add_argument("--unlabeled", type=int, default=40000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unlabeled-ratio", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, path = args.child
        fn = run_nsd if side == "nsd" else run_bare
        print(json.dumps(fn(path, args.steps, args.batch_size, args.unlabeled_ratio, args.workers)))
        return

    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    path = str(make_store(args.labeled, args.unlabeled))
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--unlabeled-ratio", str(args.unlabeled_ratio), "--workers", str(args.workers)]
    print(f"store {path}: {args.labeled:,} labeled + {args.unlabeled:,} pseudo-labeled images; {args.steps} steps of "
          f"{args.batch_size}+{args.batch_size * args.unlabeled_ratio}, {args.workers} workers per stream, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); load {_load()}", flush=True)
    rounds = []
    for i in range(args.repeats):
        order = ["nsd", "bare"] if i % 2 == 0 else ["bare", "nsd"]
        got = {side: _run_side(side, path, common) for side in order}
        got["command_s"] = nsd_command(path, args.steps, args.batch_size, args.unlabeled_ratio, args.workers)
        rounds.append(got)
        n, b = got["nsd"], got["bare"]
        print(f"round {i} ({' '.join(order)}): loop img/s nsd {n['loop_ips']:.0f} bare {b['loop_ips']:.0f} "
              f"= {n['loop_ips'] / b['loop_ips']:.2f}; nsd train() {n['call_s']:.1f} s, `nsd train` "
              f"{got['command_s']:.1f} s, bare process {b['wall_s']:.1f} s (decode {b['decode_s']:.1f} s); CPU s of the "
              f"process trees: nsd {n['cpu_s']:.1f}, bare {b['cpu_s']:.1f}", flush=True)
    images = args.steps * args.batch_size * (1 + args.unlabeled_ratio)
    loop = statistics.median(r["nsd"]["loop_ips"] / r["bare"]["loop_ips"] for r in rounds)
    # The whole command vs the bare loop's images over the bare loop's own time: what a user waits for.
    command = statistics.median((images / r["command_s"]) / r["bare"]["loop_ips"] for r in rounds)
    processes = statistics.median(r["bare"]["wall_s"] / r["command_s"] for r in rounds)
    print(f"whole `nsd train` command vs the whole bare process (imports and decode included): "
          f"{processes:.2f} (bare process seconds / nsd command seconds)")
    print(f"\nmedians over {len(rounds)} rounds: loop img/s nsd {statistics.median(r['nsd']['loop_ips'] for r in rounds):.0f}, "
          f"bare {statistics.median(r['bare']['loop_ips'] for r in rounds):.0f}; nsd/bare loop {loop:.2f}; "
          f"whole `nsd train` command ({images:,} images) / bare loop {command:.2f}; load {_load()}")


def _run_side(side: str, path: str, common: list[str]) -> dict:
    """One side in a fresh Python: its result, plus the wall time of the whole process."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, __file__, *common, "--child", side, path], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = _children_cpu() - cpu0  # the side's process and its DataLoader workers
    return result


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
