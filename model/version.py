"""chanseg's version: recorded in every artifact and package it writes, and in the cache
keys of what it builds from the bundled model (``model.__version__`` re-exports it)."""

__version__ = "0.1.0"
