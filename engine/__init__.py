"""nsd.engine: the library behind the `nsd` command. Every CLI command is a call in here."""

from nsd.engine.errors import NsdError, StoreBusy, UsageError
from nsd.engine.release import __version__
from nsd.engine.store import Store, open_store

__all__ = ["NsdError", "StoreBusy", "UsageError", "Store", "open_store", "__version__"]
