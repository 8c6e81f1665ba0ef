"""The agent-facing REST API: v1 under /api/v1/ and the product description's /api/resources."""
