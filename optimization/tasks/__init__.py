"""Celery tasks of the optimization app (autodiscovered through this package)."""

from optimization.tasks.alerts import *  # noqa: F403
from optimization.tasks.fleet import *  # noqa: F403
from optimization.tasks.marketplace import *  # noqa: F403
from optimization.tasks.rollups import *  # noqa: F403
from optimization.tasks.scaling import *  # noqa: F403
