"""nsd.engine: the library behind the `nsd` command. Every CLI command is a call in here."""

__version__ = "0.1.0"

from nsd.engine.errors import NsdError, StoreBusy, UsageError  # noqa: E402
from nsd.engine.store import Store, open_store  # noqa: E402

__all__ = ["NsdError", "StoreBusy", "UsageError", "Store", "open_store", "__version__"]
