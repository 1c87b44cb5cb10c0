"""Packaging metadata: pyproject.toml [project] is the one source of metadata, the version is written once
(fastguide/_version.py), py.typed ships, the extras exist, the sdist carries every C++ source."""
import os
import re
import sys

import pytest

import fastguide
from fastguide import _version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_is_written_once(pyproject):
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastguide._version.__version__"}
    assert fastguide.__version__ == _version.__version__ == "0.2.0"
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    assert not re.search(r"\bversion\s*=", setup_py)


def test_setup_py_carries_no_metadata():
    """setup.py keeps only the build (packages, package_dir, ext_modules, cmdclass): metadata lives in pyproject."""
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    for kw in ("name", "version", "description", "python_requires", "install_requires", "extras_require",
               "entry_points"):
        assert not re.search(rf"^\s*{kw}\s*=", setup_py, re.M), kw


def test_project_metadata(pyproject):
    p = pyproject["project"]
    assert p["name"] == "fastguide" and p["description"]
    assert p["readme"] == {"file": "README.md", "content-type": "text/markdown"}
    assert p["license"] == "MIT" and p["license-files"] == ["LICENSE"]
    assert p["requires-python"] == ">=3.9" and p["dependencies"] == ["torch>=2.4"]
    assert any(c.startswith("Programming Language :: Python :: 3") for c in p["classifiers"])
    assert "Typing :: Typed" in p["classifiers"]
    assert not any(c.startswith("License ::") for c in p["classifiers"])  # PEP 639: the expression says it
    assert p["scripts"] == {"fastguide": "fastguide.__main__:main"}
    lic = open(os.path.join(ROOT, "LICENSE")).read()
    assert lic.startswith("MIT License") and "2026 fastguide developers" in lic


def test_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    want = {"triton": {"triton"},
            "diffusers": {"diffusers", "transformers", "kornia"},
            "bench": {"pytest-benchmark", "matplotlib", "tqdm", "diffusers", "transformers", "kornia"},
            "lab": {"scikit-learn", "safetensors", "diffusers", "matplotlib"},
            "test": {"pytest", "pytest-benchmark", "diffusers", "transformers", "kornia", "matplotlib", "tqdm",
                     "scikit-learn"}}
    assert {k: set(v) for k, v in extras.items()} == want


def test_build_never_pulls_torch_by_surprise(pyproject):
    """An isolated build would download a second torch: build requires name none, builds use no isolation."""
    requires = pyproject["build-system"]["requires"]
    assert not any(re.match(r"torch\b", r) for r in requires)
    assert any(r.startswith("setuptools>=") for r in requires)  # PEP 639 license metadata: setuptools >= 77
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert "--no-build-isolation" in text.split("[project]")[0]


def test_py_typed_ships(pyproject):
    assert os.path.isfile(os.path.join(os.path.dirname(fastguide.__file__), "py.typed"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["fastguide"]


def test_sdist_takes_every_csrc_file():
    """MANIFEST.in grafts csrc/ (headers, subfolders) and kernels/; setuptools alone takes only the listed .cpp."""
    lines = [ln.split("#")[0].split() for ln in open(os.path.join(ROOT, "MANIFEST.in"))]
    rules = {(ln[0], ln[1]) for ln in lines if len(ln) >= 2}
    assert ("graft", "csrc") in rules and ("graft", "kernels") in rules


def test_lab_weights_ship(pyproject):
    """The lab's trained weights are package data: listed for the wheel, grafted into the sdist."""
    from fastguide.lab import models
    data = pyproject["tool"]["setuptools"]["package-data"]["fastguide.lab"]
    assert "weights/*.safetensors" in data
    for name in models.WEIGHTS.values():
        assert os.path.isfile(os.path.join(models.WEIGHTS_DIR, name)), name
    assert "fastguide/lab/weights" in open(os.path.join(ROOT, "MANIFEST.in")).read()
