"""synckit: a SyncKit-compatible document sync server for Twisted."""

__version__ = "0.1.0"
