"""The built wheel: every module of the two packages, the CUDA sources, the type marker, one version.

``recipes/`` is run from a checkout (``python -m recipes.compare``) and is not in the wheel: a
top-level ``recipes`` package in site-packages could shadow another distribution's.
"""

import email
import pathlib
import subprocess
import sys
import zipfile

import pytest

import ec_hooks

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ec_hooks", "lightning_plugin")


@pytest.mark.slow
def test_wheel_holds_the_packages_the_cuda_sources_and_py_typed_but_not_recipes(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("ec_hooks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources in cuda/"
    for name in sources:
        assert f"ec_hooks/_cuda/{name}" in names
    # every module of the checkout, so that a new subpackage missing from pyproject's list fails here
    modules = [p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    assert "ec_hooks/kernels/__init__.py" in modules
    missing = sorted(m for m in modules if m not in names)
    assert not missing, f"not in the wheel (add the subpackage to [tool.setuptools] packages): {missing}"
    for package in PACKAGES:
        assert f"{package}/py.typed" in names
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {*PACKAGES, f"ec_hooks-{ec_hooks.__version__}.dist-info"}, top_level

    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    version = email.message_from_bytes(zipfile.ZipFile(wheel).read(metadata))["Version"]
    assert version == ec_hooks.__version__
