"""One command that proves the CUDA path on a GPU machine (or, with --cpu, runs the same steps on a CPU machine).

    python benchmarks/validate_gpu.py --out DIR          # a CUDA machine: <= 8 min on a bare H100/H200, no internet
    python benchmarks/validate_gpu.py --cpu --out DIR    # any machine: CPU build, CPU op tests, CPU rows, <= 3 min

Steps (each with its own time budget; a failed build stops the run, fail-fast):
  env        torch / CUDA versions, GPU name, SM count, L2 size, measured copy bandwidth
  build      `setup.py build_ext --inplace` for the present architecture only (OPDX_CUDA_ARCH_LIST from the device,
             MAX_JOBS = cores); --cpu: OPDX_CUDA=0, skipped when opdx/_C.so is newer than every source
  tests      the kernel tests on the device (CUDA: every test parametrized on `cuda`; --cpu: a CPU selection)
  sanitizer  compute-sanitizer memcheck + racecheck over a driver calling every op fwd+bwd on odd shapes (CUDA
             only; skipped with a note when the tool is missing or the runtime refuses it)
  bench      opdx vs torch eager vs torch.compile (vs Liger when importable) at the headline shapes (--cpu: small
             shapes, few repetitions) into benchmarks/results/<device>-<op>.json and benchmarks/README.md
             (--cpu: DIR/results only), the markdown table of the run in DIR/benchmarks.md, % of copy bandwidth
Writes DIR/summary.json and DIR/*.log; exits non-zero when any step failed. Needs no DeepSpeed / vLLM / internet.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
KERNEL_TESTS = ["tests/test_edge_policy.py", "tests/test_token_logprobs.py", "tests/test_generalized_jsd.py",
                "tests/test_topk.py", "tests/test_linear_losses.py"]
# --cpu runs a selection that fits its budget on 2 cores: the edge-case policy in full, and of the rest the first
# dtype (float32: "dtype0") at mid-size shapes, teacher_topk and the mask tests (~70 tests)
CPU_TEST_SELECTION = "(edge or shape2 or shape3 or teacher_topk or mask) and not dtype1 and not dtype2 and not cuda"
# seconds per step: the GPU run must end within 8 minutes on a bare H100/H200 (16 cores), the CPU run within 3
BUDGET_S = {"gpu": {"build": 180, "tests": 100, "sanitizer": 70, "bench": 110},
            "cpu": {"build": 100, "tests": 45, "sanitizer": 0, "bench": 40}}


class Run:
    """The summary being built: one entry per step, the deadline every step's timeout is cut to."""

    def __init__(self, out: str, device: str, total_s: float):
        self.out, self.device = out, device
        self.deadline = time.monotonic() + total_s
        self.summary = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}, "ok": True}

    def left(self, want: float) -> float:
        return max(1.0, min(want, self.deadline - time.monotonic()))

    def step(self, name: str, ok: bool, seconds: float, **detail) -> None:
        self.summary["steps"][name] = {"ok": ok, "seconds": round(seconds, 1), **detail}
        if not ok:
            self.summary["ok"] = False
        print(f"[validate] {name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s {detail if not ok else ''}",
              flush=True)

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
        """Runs cmd from the repository root, output to DIR/<name>.log; rc 124 on timeout."""
        t0 = time.monotonic()
        full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n[validate] timed out after {timeout:.0f} s"
            text = text if isinstance(text, str) else text.decode(errors="replace")
        with open(os.path.join(self.out, f"{name}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n" + text)
        return rc, text, time.monotonic() - t0


def environment(run: Run) -> None:
    import torch

    from common import copy_bandwidth

    t0 = time.monotonic()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cores": os.cpu_count(), "nvcc": shutil.which("nvcc")}
    if run.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   l2_mb=getattr(props, "L2_cache_size", 0) / 2**20, memory_gb=props.total_memory / 2**30)
    env["copy_gb_per_s"] = copy_bandwidth(run.device) / 1e9
    run.summary["env"] = env
    print("[validate] environment:", json.dumps(env), flush=True)
    run.step("env", True, time.monotonic() - t0)


def extension_up_to_date() -> bool:
    so = glob.glob(os.path.join(ROOT, "opdx", "_C*.so"))
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True) + [os.path.join(ROOT, "setup.py")]
    return bool(so) and min(os.path.getmtime(p) for p in so) > max(os.path.getmtime(p) for p in sources)


def build(run: Run, budget: float) -> bool:
    env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if run.device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        env.update(OPDX_CUDA="1", OPDX_CUDA_ARCH_LIST=f"{major}.{minor}", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}")
    else:
        env["OPDX_CUDA"] = "0"
        if extension_up_to_date():
            run.step("build", True, 0.0, note="opdx/_C.so is newer than every source: not rebuilt")
            return True
    rc, text, secs = run.sh("build", [sys.executable, "setup.py", "build_ext", "--inplace"], run.left(budget), env)
    run.step("build", rc == 0, secs, build_s=round(secs, 1), arch=env.get("OPDX_CUDA_ARCH_LIST", "cpu"),
             tail=text[-1500:] if rc else "")
    return rc == 0


def junit_counts(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"]}


def tests(run: Run, budget: float) -> None:
    xml = os.path.join(run.out, "tests.xml")
    select = "cuda" if run.device == "cuda" else CPU_TEST_SELECTION
    cmd = [sys.executable, "-m", "pytest", "-q", "--maxfail=30", "-p", "no:cacheprovider", *KERNEL_TESTS, "-k", select,
           f"--junitxml={xml}"]
    rc, text, secs = run.sh("tests", cmd, run.left(budget), {"OMP_NUM_THREADS": "1"} if run.device == "cpu" else {})
    counts = junit_counts(xml) if os.path.exists(xml) else {"passed": 0, "failed": 0, "skipped": 0}
    ok = rc == 0 and counts["passed"] > 0
    run.summary["tests"] = counts
    run.step("tests", ok, secs, **counts, selection=select, tail=text[-1500:] if not ok else "")


def sanitizer(run: Run, budget: float) -> None:
    if run.device != "cuda":
        run.summary["sanitizer"] = {"skipped": "CPU run: compute-sanitizer checks CUDA kernels only"}
        return
    tool = shutil.which("compute-sanitizer") or next(iter(glob.glob("/usr/local/cuda*/bin/compute-sanitizer")), None)
    if tool is None:
        run.summary["sanitizer"] = {"skipped": "compute-sanitizer not found (CUDA toolkit bin/ not on PATH)"}
        return
    findings = {}
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, os.path.abspath(__file__), "--driver"]
        rc, text, secs = run.sh(f"sanitizer-{check}", cmd, run.left(budget / 2))
        summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
        if summary is None and rc != 0:  # the tool never reached the driver's end: refused or unsupported
            findings[check] = {"skipped": f"compute-sanitizer exited {rc} without a summary (see sanitizer-{check}.log)"}
            continue
        errors = int(summary.group(1)) if summary else 0
        findings[check] = {"errors": errors, "seconds": round(secs, 1)}
        run.step(f"sanitizer-{check}", rc == 0 and errors == 0, secs, errors=errors)
    run.summary["sanitizer"] = findings


def driver(dev: str = "cuda") -> None:
    """Every op forward + backward on odd shapes (V not a multiple of any vector width, N = 1)."""
    import torch

    import opdx

    for dtype in (torch.float32, torch.bfloat16):
        for n, v in ((1, 37), (5, 1001)):
            x = (torch.randn(n, v, device=dev) * 3).to(dtype).requires_grad_(True)
            t = (torch.randn(n, v, device=dev) * 3).to(dtype)
            lp, h = opdx.ops.token_logprobs(x, torch.randint(0, v, (n,), device=dev), return_entropy=True)
            (lp.sum() + h.sum()).backward()
            for beta in (0.0, 0.5, 1.0):
                opdx.ops.generalized_jsd(x, t, beta=beta).sum().backward()
            ids, tl, _ = opdx.ops.teacher_topk(t, min(8, v))
            opdx.ops.topk_kl_from_logits(x, ids, tl, beta=0.5, tail=True).sum().backward()
            d = 24
            hs = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(v, d, device=dev) / d**0.5).to(dtype).requires_grad_(True)
            opdx.ops.topk_kl(hs, w, ids, tl, beta=0.5, tail=True).sum().backward()
            opdx.ops.linear_token_logprobs(hs, w, torch.randint(0, v, (n,), device=dev)).sum().backward()
            opdx.ops.linear_generalized_jsd(hs, w, hs.detach(), w.detach() * 0.9, beta=0.5).sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    print("[driver] every op ran forward + backward")


def bench_cases(device: str) -> list[dict]:
    """The headline shapes on CUDA (issue 18); small ones on CPU."""
    if device == "cuda":
        return [dict(op="token_logprobs", n=16384, v=151936, dtype="bfloat16"),
                dict(op="generalized_jsd", n=8192, v=131072, dtype="bfloat16", beta=0.5),
                dict(op="teacher_topk", n=8192, v=151936, dtype="bfloat16", k=64)]
    return [dict(op="token_logprobs", n=64, v=32768, dtype="float32"),
            dict(op="generalized_jsd", n=64, v=32768, dtype="float32", beta=0.5),
            dict(op="teacher_topk", n=64, v=32768, dtype="float32", k=64)]


def bench_impls(case: dict, device: str):
    """name -> (fn(x, t), bytes moved): fwd + bwd for the losses, forward for teacher_topk."""
    import torch

    import opdx
    from opdx.ops import reference

    op, beta = case["op"], case.get("beta", 0.5)
    if op == "token_logprobs":
        def eager(x, t):
            return reference.token_logprobs(x.float(), t)
        mine = lambda x, t: opdx.ops.token_logprobs(x, t)  # noqa: E731
        liger = None
    elif op == "generalized_jsd":
        def eager(x, t):
            return reference.generalized_jsd(x.float(), t.float(), beta)
        mine = lambda x, t: opdx.ops.generalized_jsd(x, t, beta=beta)  # noqa: E731

        def liger(x, t):
            from liger_kernel.transformers import LigerJSD

            return LigerJSD(beta=beta)(torch.log_softmax(x.float(), -1), torch.log_softmax(t.float(), -1))
    else:
        def eager(x, _t):
            xf = x.float()
            vals, ids = xf.topk(case["k"], dim=-1)
            return ids, vals - torch.logsumexp(xf, -1, keepdim=True)
        mine = lambda x, _t: opdx.ops.teacher_topk(x, case["k"])  # noqa: E731
        liger = None
    impls = {"opdx": mine, "torch_eager": eager}
    if device == "cuda":  # on the CPU, compiling takes longer than the whole --cpu budget
        impls["torch_compile"] = torch.compile(eager)
    if liger is not None:
        try:
            import liger_kernel  # noqa: F401

            impls["liger"] = liger
        except ImportError:
            pass
    return impls


def bench_one(case: dict, device: str, reps: int, deadline: float) -> dict:
    import torch

    from common import measure, record

    n, v, dtype = case["n"], case["v"], getattr(torch, case["dtype"])
    x = (torch.randn(n, v, device=device) * 3).to(dtype)
    other = (torch.randn(n, v, device=device) * 3).to(dtype) if case["op"] == "generalized_jsd" else \
        torch.randint(0, v, (n,), device=device)
    backward = case["op"] != "teacher_topk"
    leaf = x.requires_grad_(backward)
    elem = x.element_size()
    # benchmarks/report.py's byte counts: fwd+bwd 3·N·V·elem (token_logprobs: read, re-read, gradient write;
    # generalized_jsd: both reads + the gradient write), teacher_topk one read
    bytes_moved = (3 if backward else 1) * n * v * elem
    rows = {}
    for name, fn in bench_impls(case, device).items():
        if time.monotonic() > deadline:
            rows[name] = {"skipped": "bench budget spent"}
            continue

        def call(fn=fn):
            if not backward:
                with torch.no_grad():
                    return fn(leaf, other)
            return torch.autograd.grad(fn(leaf, other).sum(), leaf)[0]
        try:
            call()  # compile / warm up outside the timed region
            row = measure(call, device, bytes_moved=bytes_moved, reps=reps)
        except Exception as e:  # one implementation failing (e.g. out of memory) is recorded, not fatal to the rest
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        mode = "fwd_bwd" if backward else "fwd"
        key = {k: case[k] for k in case if k != "op"} | {"mode": mode}
        record(case["op"], device, key, name, row)
        rows[name] = {k: round(val, 3) for k, val in row.items()}
    return rows


def bench(run: Run, budget: float) -> None:
    import common

    if run.device == "cpu":  # quick rows must not replace the committed CPU results
        common.RESULTS_DIR = os.path.join(run.out, "results")
    t0 = time.monotonic()
    results, ok = {}, True
    deadline = t0 + run.left(budget)
    for case in bench_cases(run.device):
        if time.monotonic() > deadline:
            results[case["op"]] = {"skipped": f"bench budget of {budget:.0f} s spent"}
            ok = False
            continue
        rows = bench_one(case, run.device, reps=5 if run.device == "cuda" else 2, deadline=deadline)
        results[case["op"]] = {"case": case, "rows": rows}
        ok = ok and "opdx" in rows and "error" not in rows["opdx"]
    run.summary["bench"] = results
    run.summary["pct_copy_bw"] = {op: r["rows"]["opdx"].get("pct_copy_bw") for op, r in results.items()
                                  if "rows" in r and "pct_copy_bw" in r["rows"].get("opdx", {})}
    import report

    with open(os.path.join(run.out, "benchmarks.md"), "w") as f:  # the markdown table of this run's result files
        f.write(report.render(common.RESULTS_DIR))
    rc = 0
    if run.device == "cuda":  # the committed table, benchmarks/README.md, from every result file
        rc, _, _ = run.sh("report", [sys.executable, os.path.join(HERE, "report.py")], run.left(30))
    run.step("bench", ok and rc == 0, time.monotonic() - t0, pct_copy_bw=run.summary["pct_copy_bw"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for summary.json and the logs")
    parser.add_argument("--cpu", action="store_true", help="run the same steps on the CPU (no GPU needed)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's target
    args = parser.parse_args()
    if args.driver:
        sys.path.insert(0, ROOT)
        driver()
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    os.makedirs(args.out, exist_ok=True)
    sys.path[:0] = [ROOT, HERE]  # this checkout's opdx (a bare machine has nothing installed) and benchmarks/common
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("[validate] no CUDA device visible to torch: run with --cpu on a CPU machine", file=sys.stderr)
        return 2
    budgets = BUDGET_S["cpu" if args.cpu else "gpu"]
    run = Run(args.out, device, total_s=sum(budgets.values()) + 30)
    environment(run)
    if build(run, budgets["build"]):
        tests(run, budgets["tests"])
        sanitizer(run, budgets["sanitizer"])
        bench(run, budgets["bench"])
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(run.summary, f, indent=1)
    print(f"[validate] {'PASSED' if run.summary['ok'] else 'FAILED'}: {os.path.join(args.out, 'summary.json')}")
    return 0 if run.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
