"""The package as a user installs it: a wheel, installed outside the repository, runs the CLI and the demo.

The wheel is built from this checkout (no download) and installed into a fresh virtual environment whose only
other entries are the dependencies of the project's ``.venv`` (added as a plain path, so the editable install of
the checkout is not on it). Every command then runs from an empty folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(python: Path, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools builds in the source tree (build/, *.egg-info) and would package
    # whatever a stale build/lib still holds.
    source = tmp_path_factory.mktemp("source") / "ravlt_pl"
    top_level = {".git", ".venv", "build", "ravlt_pl.egg-info", "data", "outputs", "tests"}

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or (Path(folder) == REPO and n in top_level)}

    shutil.copytree(REPO, source, ignore=skip, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("ravlt_pl-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; dependencies come from this interpreter's site-packages."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv).stdout.strip()
    )
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    # The dependencies, as a plain path entry: .pth files there (the checkout's editable finder) are not run.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_carries_the_configs_and_the_benchmark(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ravlt_pl/configs/cls_s.yaml", "ravlt_pl/configs/demo/cls.yaml", "ravlt_pl/configs/det/maskrcnn_s_1x.yaml",
                 "ravlt_pl/configs/seg/fpn_s_80k.yaml", "ravlt_pl/benchmark/runner.py",
                 "ravlt_pl/benchmark/authors_reference.py",
                 "ravlt_pl/weights/demo_classifier.pt"):  # fmt: skip
        assert name in names, name
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    result = _run(installed, "-c", "import ravlt_pl; print(ravlt_pl.__file__)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stdout.strip().startswith(str(REPO)), result.stdout


def test_summary_runs_from_outside_the_repository(installed, tmp_path):
    result = _run(installed, "-m", "ravlt_pl", "summary", "--config", "cls_s.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["params_m"] == 25.59 and summary["published"]["params_m"] == 26


def test_benchmark_help_runs_from_outside_the_repository(installed, tmp_path):
    result = _run(installed, "-m", "ravlt_pl", "benchmark", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--models" in result.stdout


@pytest.mark.slow
def test_classification_demo_runs_from_outside_the_repository(installed, tmp_path):
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"]
    result = _run(installed, "-m", "ravlt_pl.demo", "classification", *short, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classification demo: validation" in result.stdout
    assert (tmp_path / "data" / "synthetic" / "classification").is_dir()  # written under the working directory
    assert list(tmp_path.glob("outputs/**/reports/validate/classification_val.json"))
