"""The CMake build compiles the same sources as setup.py into a loadable library with the same ops."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_configures_builds_and_loads(tmp_path):
    import torch

    build = tmp_path / "build"
    env = {**os.environ, "OPDX_CUDA": "0"}
    subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython3_EXECUTABLE={sys.executable}"],
        check=True, capture_output=True, env=env, timeout=300,
    )
    proc = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lib = build / "_C.so"
    assert lib.exists()
    # Load in a fresh interpreter (the installed opdx._C already registered the same ops in this one).
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        x = torch.randn(3, 50); t = torch.tensor([1, 2, 49])
        lp = torch.ops.opdx.token_logprobs_fwd(x, t, 1.0, -100, False, False)[0]
        assert torch.allclose(lp, torch.log_softmax(x, -1).gather(-1, t[:, None]).squeeze(-1), atol=1e-5)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
