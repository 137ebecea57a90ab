"""Object-store data paths (s3://, and S3-compatible services such as MinIO or GCS' XML API).

One set of standard settings configures both readers of the data path:

* DuckDB (httpfs), which reads and writes the store's Parquet files, and
* fsspec (s3fs), which reads and writes checkpoints and label parts.

The settings are the usual AWS variables: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for a server other than AWS. s3fs reads them itself; for DuckDB,
which ignores ``AWS_ENDPOINT_URL`` and always builds virtual-host URLs, each connection gets a
temporary S3 secret made from them: endpoint without its scheme, path-style URLs when an
endpoint is given (what MinIO and most self-hosted servers need; ``NSD_S3_URL_STYLE`` overrides),
SSL from the endpoint's scheme.

With none of these set, nsd creates no secret: DuckDB then uses a persistent secret the user
created (``CREATE PERSISTENT SECRET ... (TYPE s3, ...)``), and s3fs its own configuration
(``~/.aws``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from nsd.engine.errors import UsageError
from nsd.engine.paths import quote

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "r2", "http", "https", "hf", "az", "abfss")


def is_remote(path: str | None) -> bool:
    """PATH is a URL of an object store (not a local path, not file://)."""
    return bool(path) and "://" in path and not path.startswith("file://")


def s3_settings(env=None) -> dict | None:
    """The S3 settings found in ENV (default os.environ), or None when nothing is set."""
    env = os.environ if env is None else env
    key = env.get("AWS_ACCESS_KEY_ID")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not key and not endpoint:
        return None
    out = {"region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if key:
        out["key_id"] = key
        out["secret"] = env.get("AWS_SECRET_ACCESS_KEY", "")
        if env.get("AWS_SESSION_TOKEN"):
            out["session_token"] = env["AWS_SESSION_TOKEN"]
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"AWS_ENDPOINT_URL must be http(s)://host[:port], got {endpoint!r}")
        out["endpoint"] = parts.netloc + parts.path.rstrip("/")
        out["use_ssl"] = parts.scheme == "https"
        out["url_style"] = "path"
    style = env.get("NSD_S3_URL_STYLE")
    if style:
        if style not in ("path", "vhost"):
            raise UsageError(f"NSD_S3_URL_STYLE must be path or vhost, got {style!r}")
        out["url_style"] = style
    return out


def secret_sql(settings: dict) -> str:
    """``CREATE TEMPORARY SECRET`` for DuckDB's httpfs from s3_settings()."""
    def lit(v) -> str:
        return f"'{quote(v)}'"

    opts = ["TYPE s3", f"REGION {lit(settings['region'])}"]
    for key, name in (("key_id", "KEY_ID"), ("secret", "SECRET"), ("session_token", "SESSION_TOKEN"),
                      ("endpoint", "ENDPOINT"), ("url_style", "URL_STYLE")):
        if key in settings:
            opts.append(f"{name} {lit(settings[key])}")
    if "use_ssl" in settings:
        opts.append(f"USE_SSL {str(settings['use_ssl']).lower()}")
    return f"CREATE OR REPLACE TEMPORARY SECRET nsd_s3 ({', '.join(opts)})"


def configure_duckdb(con) -> None:
    """Give connection CON access to s3:// from the environment (no-op when nothing is set)."""
    settings = s3_settings()
    if settings is not None:
        con.execute(secret_sql(settings))
