"""Entry points of the line's processes, one module per process (``python -m workers.<name>``)."""
