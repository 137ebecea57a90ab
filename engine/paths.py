"""Locations as nsd passes them around: fsspec paths and URLs, and paths inside SQL text.

A store's data path, a checkpoint or a source may be a local path or an object-store URL;
fsspec opens either. These helpers are the one place that turns an fsspec (filesystem, path)
pair back into a URL, asks whether a location exists, and quotes a location for SQL.
"""

from __future__ import annotations

import os


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
