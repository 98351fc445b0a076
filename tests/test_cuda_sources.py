"""Every CUDA source compiles with nvcc (for Hopper and for a generic PTX target) and defines
every kernel the loader launches.  Skipped where nvcc is absent."""

import pathlib
import re
import shutil
import subprocess

import pytest

from ec_hooks.kernels.cuda import KERNEL_NAMES, SOURCE_FILES

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# sm_90: the H100/H200 machine code; compute_75: PTX for the oldest architecture that both
# CUDA 12 and CUDA 13 support, which the driver can JIT for any later GPU.
TARGETS = {
    "sm_90": ["-gencode", "arch=compute_90,code=sm_90"],
    "compute_75": ["-gencode", "arch=compute_75,code=compute_75"],
}


def test_loader_ships_every_source():
    assert {p.name for p in SOURCES} == set(SOURCE_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles(source, target, tmp_path):
    out = (
        tmp_path / f"{source.stem}.ptx" if target.startswith("compute") else tmp_path / f"{source.stem}.cubin"
    )
    kind = "--ptx" if target.startswith("compute") else "--cubin"
    result = subprocess.run(
        [NVCC, kind, *TARGETS[target], "--Werror", "all-warnings", "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    if kind == "--ptx":
        defined = set(re.findall(r"\.visible \.entry (\w+)\(", out.read_text()))
        missing = set(KERNEL_NAMES) - defined
        assert not missing, f"kernels launched by the loader but not defined: {sorted(missing)}"
    else:
        assert out.stat().st_size > 0
