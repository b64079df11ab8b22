"""Server-side apply bodies are YAML to the apiserver: text that JSON leaves raw must stay valid."""

from __future__ import annotations

import yaml

from tandem.kube import apply_body


def test_apply_body_round_trips_through_yaml() -> None:
    value = "x\x85y\x7f\x9f\U0001f600é\x01\ttab\nline"
    body = apply_body({"data": {"k": value}})
    assert "\x85" not in body and "\x7f" not in body  # escaped, not raw
    assert "\U0001f600" in body  # beyond the BMP: UTF-8, not a surrogate pair
    assert yaml.safe_load(body) == {"data": {"k": value}}
