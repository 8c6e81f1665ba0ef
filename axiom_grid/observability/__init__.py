"""What an operator sees of the running service: Prometheus metrics and structured logs.

- ``metrics``: every metric's one definition (names ``axiom_grid_*``), counted where the outcome is known:
  HTTP requests in the middleware, allocations in ``allocation.services.allocation_write`` and
  ``allocation.batch``, tasks in ``task_signals``, alert deliveries in
  ``optimization.services.alert_delivery``.
- ``exposition``: ``/metrics`` (operator key), over every process of the host in multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``), with the fleet's utilization read from the cache.
- ``middleware``: the request id (``X-Request-ID``) and the HTTP metrics of each request.
- ``logs``: JSON lines (``LOG_FORMAT=json``) carrying the request id or the task id of their line.
"""
