"""End-to-end tests and their harness (run with `pytest e2e`; not part of the operator package)."""
