"""Optimization endpoints of the v1 API; each module has its own ``urlpatterns``."""
