"""Per-domain evaluation, transfer metrics and the run report."""
