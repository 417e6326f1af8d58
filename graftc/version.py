"""graftc's version (the artifact manifest records it); `graftc.__version__` is this."""
__version__ = "0.1.0"
