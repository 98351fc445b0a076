"""The built wheel carries the CUDA sources and every package."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contains_cuda_sources_and_packages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("ec_hooks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources in cuda/"
    for name in sources:
        assert f"ec_hooks/_cuda/{name}" in names
    for module in ("ec_hooks/__init__.py", "ec_hooks/hooks.py", "ec_hooks/kernels/__init__.py",
                   "lightning_plugin/__init__.py", "recipes/__init__.py"):
        assert module in names, module
