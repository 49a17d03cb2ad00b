"""Compile-checks the CUDA kernels with the local nvcc on machines without a CUDA torch.

Every csrc/cuda/*_kernels.cuh is torch-free and ends with explicit instantiations under OPDX_COMPILE_CHECK, so
nvcc compiles real device code for sm_80 and sm_90 (syntax, templates, register/spill report). Skipped without nvcc.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_kernels.cuh")))


def nvcc():
    path = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
    if path is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        path = "/usr/local/cuda/bin/nvcc"
    return path


def test_every_cuda_launch_file_has_a_torch_free_kernel_header():
    for cu in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        header = cu[: -len(".cu")] + "_kernels.cuh"
        assert os.path.exists(header), f"{cu} should keep its device code in {os.path.basename(header)}"
    assert KERNEL_HEADERS


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("header", KERNEL_HEADERS, ids=os.path.basename)
def test_kernels_compile_with_nvcc(header, tmp_path):
    text = open(header).read()
    assert "OPDX_COMPILE_CHECK" in text, f"{header} needs an OPDX_COMPILE_CHECK instantiation block"
    src = tmp_path / "check.cu"
    src.write_text(f'#include "{os.path.basename(header)}"\n')
    cmd = [
        nvcc(), "-c", str(src), "-o", str(tmp_path / "check.o"), "-std=c++17", "--expt-relaxed-constexpr",
        "-DOPDX_COMPILE_CHECK", f"-I{ROOT}/csrc/include", f"-I{ROOT}/csrc/cuda",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
        "-Werror", "all-warnings",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Device code must not spill registers to local memory (it would be far off the bandwidth roofline).
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    assert spills and max(spills) == 0, proc.stderr[-4000:]
