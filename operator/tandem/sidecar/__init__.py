"""Tandem's KV-transfer sidecar: NIXL-backed, layer-wise pulls of KV blocks between worker pods,
with block-layout translation between vendors in host memory. Run it with ``python -m tandem.sidecar``."""
