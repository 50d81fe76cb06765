"""spear: a self-contained serverless platform. One program runs on every host."""

__version__ = "0.1.0"
