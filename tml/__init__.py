"""tml: co-training framework for interaction models."""

__version__ = "0.1.0"
