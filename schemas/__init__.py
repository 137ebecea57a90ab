"""Table definitions and SQL of nsd, as plain .sql files a user can read and run in DuckDB."""

from importlib import resources

TABLES = ("images", "classes", "rejects", "runs", "pseudo_labels", "selections", "models", "tags", "image_hashes")
# Tables added after stores were first made: `nsd init` adds them to an older store.
LATER_TABLES = ("image_hashes",)


def read_sql(name: str) -> str:
    """Text of schemas/<name>.sql."""
    return resources.files(__name__).joinpath(f"{name}.sql").read_text()


def sql_path(name: str) -> str:
    """Filesystem path of schemas/<name>.sql (for lineage and --show-sql)."""
    return str(resources.files(__name__).joinpath(f"{name}.sql"))
