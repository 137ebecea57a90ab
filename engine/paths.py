"""Locations as nsd passes them around: fsspec paths and URLs, and paths inside SQL text.

A store's data path, a checkpoint or a source may be a local path or an object-store URL;
fsspec opens either. These helpers are the one place that turns an fsspec (filesystem, path)
pair back into a URL, asks whether a location exists, and quotes a location for SQL.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from nsd.engine.errors import UsageError


def exists(url: str) -> bool:
    """Whether the file or directory at URL (a local path or an fsspec URL) exists."""
    import fsspec  # here, not at the top: the store and the inspection commands need no fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def url(fs, path: str) -> str:
    """PATH on filesystem FS as a user (or DuckDB) writes it: plain for local files, with the
    scheme otherwise (fsspec strips it: ``s3://b/k`` is path ``b/k`` on the s3 filesystem)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def quote(text: str | os.PathLike) -> str:
    """TEXT for the inside of a SQL string literal ('...'): single quotes doubled.

    For what DuckDB takes only as literal text (file paths in LOAD, ATTACH, COPY, SET);
    values go in as bound parameters instead.
    """
    return str(text).replace("'", "''")


def output_file(out: str | os.PathLike, *, force: bool = False, protect: tuple = ()) -> Path:
    """The checked location of a file nsd writes at a user's path (``-o``), resolved.

    Refused, each with one clear line: a directory, a missing parent, a symbolic link (never
    followed), anything that exists but is not a regular file (FIFO, device, socket), an
    existing file unless FORCE, and any path inside one of PROTECT (a store's own directories).
    """

    path = Path(out).expanduser()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"-o {out}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"-o {out}: is a symbolic link; nsd does not write through links")
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"-o {out}: is a directory; give a file name such as report.html")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"-o {out}: exists and is not a regular file")
        if not force:
            raise UsageError(f"-o {out}: exists; pass --force to replace it")
    return _outside(path, f"-o {out}", protect)


def output_dir(out: str | os.PathLike, *, force: bool = False, protect: tuple = (),
               marker: str = "manifest.json") -> Path:
    """The checked location of a directory nsd fills at a user's path, resolved: not a link,
    not a file, not overlapping one of PROTECT, and new, empty or (with FORCE) an earlier
    output of nsd's (it holds MARKER); never another directory that holds something."""

    path = Path(out).expanduser()
    if path.is_symlink():
        raise UsageError(f"{out}: is a symbolic link; nsd does not write through links")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    resolved = _outside(path, str(out), protect, contains_too=True)
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise UsageError(f"{out}: is not empty and holds no nsd output; give a new directory")
        if not force:
            raise UsageError(f"{out}: holds an earlier nsd output; pass --force to replace it")
    return resolved


def _outside(path: Path, what: str, protect: tuple, contains_too: bool = False) -> Path:
    """PATH resolved through its (existing) parent, refused when it is one of PROTECT or lies
    inside one (with CONTAINS_TOO, also when it contains one)."""

    if not path.parent.is_dir():
        raise UsageError(f"{what}: directory {path.parent} does not exist")
    resolved = path.parent.resolve() / path.name
    for root in protect:
        root = Path(root).resolve()
        if resolved == root or root in resolved.parents or (contains_too and resolved in root.parents):
            raise UsageError(f"{what}: is inside the store ({root}) or holds it; write it elsewhere")
    return resolved


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """DATA at PATH through a new temporary file beside it renamed into place: readers never see
    half a file, and what was at PATH is replaced only once the new one is whole. The one
    atomic write of every local file nsd makes (write_url for fsspec locations)."""

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_url(location: str, data: bytes) -> None:
    """DATA at LOCATION (a local path or an fsspec URL), whole or not at all, with its folder
    made: a local file goes through write_file; an object store's single PUT is atomic
    already. Readers (gc, a resume, another node) never see half a file."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    if url(fs, path) == path:  # a local file
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_file(Path(path), data)
    else:
        fs.pipe_file(path, data)


def read_capped(f, cap: int, chunk: int = 16 << 20) -> bytes | None:
    """All of the open binary file F, or None when it holds more than CAP bytes. Read in
    chunks, so memory follows the file's real size (one ``f.read(cap + 1)`` reserves the whole
    cap up front) and a file that grows while read is still capped."""
    parts, total = [], 0
    while True:
        part = f.read(min(chunk, cap + 1 - total))
        if part is None:  # a non-blocking file with nothing to read: not a file to trust
            return None
        if not part:
            return b"".join(parts)
        parts.append(part)
        total += len(part)
        if total > cap:
            return None
