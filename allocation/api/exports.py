"""Usage exports as CSV, streamed."""

from __future__ import annotations

urlpatterns: list = []
