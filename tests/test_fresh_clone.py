"""A fresh clone with nothing beside it: the suite collects, and checks needing outside files skip, not fail.

CI runs in a clone that has a copy of ``shared/`` beside it; a user's clone has nothing there. These
tests clone the committed repository into an empty temporary folder and run pytest inside it, so a
test that reaches outside the repository (as ``tests/test_manifests.py`` once did for the KubeRay
CRDs) shows up here rather than on a user's machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed HEAD, cloned into an empty folder (nothing beside it: no ../shared)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (or no git): nothing to clone")
    root = tmp_path_factory.mktemp("fresh")
    target = root / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)], check=True, timeout=300)
    assert sorted(p.name for p in root.iterdir()) == ["clone"]
    return target


def _pytest(clone: Path, *args: str, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SNIPER_KUBERAY_CRDS")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_whole_suite_collects_in_a_fresh_clone(clone: Path) -> None:
    result = _pytest(clone, "--collect-only", "-q", ci=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.lower().split("\n")[-2], result.stdout[-2000:]


def test_manifest_checks_skip_with_the_reason_without_the_crds(clone: Path) -> None:
    result = _pytest(clone, "tests/test_manifests.py", "-q", "-rs", ci=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "skipped" in result.stdout and "SNIPER_KUBERAY_CRDS" in result.stdout, result.stdout[-2000:]


def test_manifest_checks_fail_under_ci_without_the_crds(clone: Path) -> None:
    result = _pytest(clone, "tests/test_manifests.py", "-q", "-k", "matches_kuberay_crd", ci=True)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "CI must run these checks" in result.stdout, result.stdout[-2000:]
