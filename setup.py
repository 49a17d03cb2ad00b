"""Builds opdx._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA (OPDX_CUDA=0/1 forces it).

Environment:
  OPDX_CUDA=0|1             force the CUDA build off/on (default: on iff torch was built with CUDA and nvcc is found)
  OPDX_CUDA_ARCH_LIST="8.0;9.0"  compute capabilities to build for (default 8.0 and 9.0; "9.0a" for sm_90a)
  OPDX_CPU_ARCH=native      -march for the CPU kernels (default native; e.g. x86-64-v2 for a portable build)
  OPDX_DEBUG=1              -O0 -g
Source lists are the same globs CMakeLists.txt uses: csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu.
CUDA builds need torch >= 2.8 (MIN_CUDA_TORCH): the glue uses aten::mm.dtype (bf16/fp16 GEMMs with an fp32 output).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda(torch, cuda_home):
    forced = os.environ.get("OPDX_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"OPDX_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    return torch.version.cuda is not None and cuda_home is not None


MIN_CUDA_TORCH = (2, 8)


def check_cuda_torch(version):
    """Refuses a CUDA build against a torch without aten::mm.dtype (fp32-output bf16/fp16 GEMMs)."""
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    if (major, minor) < MIN_CUDA_TORCH:
        raise SystemExit(f"opdx: a CUDA build needs torch >= {MIN_CUDA_TORCH[0]}.{MIN_CUDA_TORCH[1]} (aten::mm.dtype, "
                         f"fp32-output bf16/fp16 GEMMs), found torch {version}; upgrade torch or build the CPU "
                         f"kernels only with OPDX_CUDA=0")


def gencode_flags(arch_list):
    flags = []
    for arch in arch_list.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = os.environ.get("OPDX_DEBUG") == "1"
    cpu_arch = os.environ.get("OPDX_CPU_ARCH", "native")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-fopenmp-simd", "-fno-trapping-math", f"-march={cpu_arch}"]
    cxx_flags += ["-DPy_LIMITED_API=0x030B0000"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    srcs = sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp")
    if want_cuda(torch, CUDA_HOME):
        check_cuda_torch(torch.__version__)
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        nvcc_flags += gencode_flags(os.environ.get("OPDX_CUDA_ARCH_LIST", "8.0;9.0"))
        return [
            CUDAExtension(
                "opdx._C",
                srcs + sources("csrc/cuda/*.cu"),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "opdx._C", srcs, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True
        )
    ]


def build_ext_cmd():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True)


setup(
    packages=find_packages(include=["opdx", "opdx.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_cmd()},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
