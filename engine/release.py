"""nsd's release number: recorded in every commit's lineage and on every report (pyproject.toml
carries the same number)."""

__version__ = "0.1.0"
