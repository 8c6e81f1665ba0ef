"""marketplace admin."""

from __future__ import annotations
