"""Python client of the Axiom Energy Grid."""

__version__ = "0.1.0"
