"""The API layer every app's views share: Bearer-key authentication and per-agent isolation (``auth``),
the JSON error body (``errors``), the mutation frame with idempotency and audit (``mutation``,
``idempotency``, ``audit``), base views and validation (``views``) and OpenAPI extensions (``schema``)."""
