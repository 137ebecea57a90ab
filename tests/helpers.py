"""What the tests share: small synthetic, learnable images written straight into a store, fresh
stores, the `nsd` command (in this process or as a real one), rows read by column name, and the
checks every CLI error must pass."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from nsd.cli.main import cli
from nsd.engine.store import Store

NSD = str(Path(sys.executable).parent / "nsd")  # the installed console script, for real processes


def synthetic_image(label: int, rng: np.random.Generator, size: int = 16, num_classes: int = 4) -> np.ndarray:
    """A grey image whose bright square's position encodes the class, plus noise."""
    img = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    step = size // cells
    r, c = divmod(label, cells)
    img[r * step:(r + 1) * step, c * step:(c + 1) * step] += 150
    return img


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def add_images(store, per_class: dict[str, int], num_classes: int = 4, size: int = 16, seed: int = 0,
               hide_labels: bool = True) -> list[str]:
    """Insert per_class[split] images per class into `images` (+ `classes`) as one snapshot.

    Unlabeled images keep their class as gold_label when hide_labels. Returns the image ids.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_class.items():
        for label in range(num_classes):
            for _ in range(n):
                data = png_bytes(synthetic_image(label, rng, size, num_classes))
                iid = hashlib.sha256(data).hexdigest()
                unl = split == "unlabeled"
                rows.append((iid, data, "png", size, size, 1, f"synthetic:{len(rows)}", split,
                             None if unl else label, label if (unl and hide_labels) else None, "test"))

    def fn(con):
        have = con.execute("SELECT count(*) FROM classes").fetchone()[0]
        if not have:
            con.executemany("INSERT INTO classes VALUES (?, ?)", [(c, f"class{c}") for c in range(num_classes)])
        con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return {"images": len(rows)}

    store.write("test-images", {"per_class": per_class, "seed": seed}, fn)
    return [r[0] for r in rows]


@contextmanager
def no_hang(seconds: int):
    """Fail the test (instead of hanging the suite) when the block runs longer than SECONDS."""
    def fail(*_):
        raise AssertionError(f"did not finish in {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- stores


def new_store(path, per_class: dict[str, int] | None = None, **images) -> Store:
    """A store created at PATH; with PER_CLASS, add_images(store, per_class, **images) into it."""
    store = Store(path)
    store.init()
    if per_class:
        add_images(store, per_class, **images)
    return store


def rows(store, sql: str, params=None, snapshot: int | None = None) -> list[tuple]:
    """SQL's rows as tuples, for whole-row comparisons."""
    with store.reader(snapshot) as con:
        return con.execute(sql, params or []).fetchall()


def records(store, sql: str, params=None, snapshot: int | None = None) -> list[dict]:
    """SQL's rows as dicts keyed by column name: r["confidence"], never r[7]."""
    with store.reader(snapshot) as con:
        cur = con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


# --------------------------------------------------------------------------- the nsd command


def _store_arg(store) -> str:
    if isinstance(store, Store):
        return str(store.root) if store.root is not None else store.uri
    return str(store)


def nsd(store, *args, input=None, env=None, data_path=None) -> Result:
    """`nsd --store STORE [--data-path DATA_PATH] ARGS...` in this process, through click's CliRunner.

    STORE is a Store or the --store text (a path or a postgres: URI); None leaves --store out.
    The result keeps stdout and stderr apart (.stdout, .stderr) and both in .output.
    """
    pre = [] if store is None else ["--store", _store_arg(store)]
    if data_path:
        pre += ["--data-path", str(data_path)]
    return CliRunner(env=env).invoke(cli, [*pre, *map(str, args)], input=input)


def nsd_argv(store, *args) -> list[str]:
    """The argv of `nsd --store STORE ARGS...` as a real process (for subprocess, torchrun, kill)."""
    return [NSD, "--store", _store_arg(store), *map(str, args)]


def nsd_process(store, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`nsd --store STORE ARGS...` as a real process, its output captured as text."""
    return subprocess.run(nsd_argv(store, *args), capture_output=True, text=True, env=env, timeout=timeout)


def json_out(result) -> dict:
    """The JSON object a command printed with --json (after any log lines before it)."""
    return json.loads(result.stdout[result.stdout.index("{"):])


def one_line_error(result, code: int = 2, contains: str = "") -> None:
    """A refused command: exit CODE, one line starting with "error:" holding CONTAINS, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and contains in lines[0], result.output
    assert "Traceback" not in result.output
