"""Signals the ledger sends for the apps built on it, which it must not import (optimization -> allocation ->
ledger, never back)."""

from __future__ import annotations

from django.dispatch import Signal

# Sent by ``reference_data_load`` once the ledger's reference data exist. A receiver creates what its own
# app adds to a fresh grid (optimization: the tiers' default scaling policies) and returns a dict of counts
# of what it created, which the loader adds to its own.
reference_data_loaded = Signal()
