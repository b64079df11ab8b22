"""Harness for the e2e suite: local control plane (kwokctl), fake GPU fleets and Prometheus."""
