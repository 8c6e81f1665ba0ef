"""Admin of the optimization app, one module per area."""

from optimization.admin import alerts, analytics, marketplace, scaling  # noqa: F401
