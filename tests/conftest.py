from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "e2e" / "samples"


@pytest.fixture
def sample_pools() -> dict[str, dict]:
    docs = yaml.safe_load_all((SAMPLES / "acceleratorpools.yaml").read_text())
    return {d["metadata"]["name"]: d["spec"] for d in docs}


@pytest.fixture
def sample_service() -> dict:
    return yaml.safe_load((SAMPLES / "inferenceservice.yaml").read_text())
