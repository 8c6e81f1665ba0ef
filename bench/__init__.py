"""Benchmarks of the grid: ``python -m bench.run [--quick]`` (``make bench`` / ``make bench-quick``).

Everything here is bench-only: its settings modules (the grid's, and the bare baseline's with no
middleware, each served by its own gunicorn), its own databases (``axiom_bench`` and ``axiom_bench_quick``)
and its own Redis keys (prefix ``axiom-bench:<database>:``). Load stays on loopback and every loop is
bounded in requests and in seconds. See docs/benchmarks.md.
"""
