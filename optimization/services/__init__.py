"""Services of the optimization app, one module per area."""
