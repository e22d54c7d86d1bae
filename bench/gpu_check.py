"""The GPU check: one script for a machine with an NVIDIA GPU (run from the repository root).

    python bench/gpu_check.py [--out DIR] [--skip-build] [--bench-time SECONDS] [--with-compile]

1. builds the extension with this machine's own torch (CUDA kernels forced on, for this GPU's
   architecture), 2. runs the CUDA and Triton tests, 3. measures the device's two ceilings once
(a large device-to-device copy and a bf16 matrix product), 4. runs the GPU benchmarks
(pytest-benchmark; CUDA-synchronised medians after warm-up) and 5. prints a short table last,
writing the full results (logs, benchmark JSON, the markdown report) under --out ($OUT or
bench/gpu_results by default). On a machine without a GPU it builds, then stops before step 2.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, log_path, env=None, timeout=None):
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, time.time() - start


def tail(path, n=15):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def ceilings(torch):
    """Device-to-device copy bandwidth (GB/s) and bf16 matmul throughput (TFLOP/s), CUDA events."""
    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: a @ b, 20)
    del src, dst, a, b
    return {"copy_GBps": 2 * n / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_s / 1e12}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "gpu_results"))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--bench-time", type=float, default=0.2, help="pytest-benchmark max time per benchmark")
    parser.add_argument("--with-compile", action="store_true", help="also time the torch.compile variants")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import torch

    summary = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        summary["gpu"] = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    else:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print("environment:", json.dumps(summary), flush=True)

    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 2))
    env.pop("TRITON_INTERPRET", None)
    if not args.skip_build:
        rc, secs = run([sys.executable, "setup.py", "build_ext", "--inplace"], os.path.join(args.out, "build.log"), env)
        summary["build"] = {"rc": rc, "seconds": round(secs, 1)}
        print(f"build: rc={rc} in {secs:.0f} s", flush=True)
        if rc:
            print(tail(os.path.join(args.out, "build.log"), 40))
            sys.exit(rc)
    if not has_gpu:
        print("no GPU visible: stopping before the CUDA and Triton tests and the GPU benchmarks")
        return

    tests_log = os.path.join(args.out, "tests.log")
    rc, secs = run([sys.executable, "-m", "pytest", "tests/", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                    "--maxfail=20"], tests_log, env)
    summary["tests"] = {"rc": rc, "seconds": round(secs, 1), "result": tail(tests_log, 1).strip()}
    print(f"tests (cuda and triton on the GPU): {summary['tests']['result']}", flush=True)

    summary["ceilings"] = ceilings(torch)
    print("ceilings:", json.dumps({k: round(v, 1) for k, v in summary["ceilings"].items()}), flush=True)

    # The end-to-end models at the targets' settings (bench/bench_models.py); the torch.compile
    # variants take minutes each to compile, so they run only on request.
    bench_json = os.path.join(args.out, "gpu_bench.json")
    select = [] if args.with_compile else ["-k", "not compile"]
    rc, secs = run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *select,
                    f"--benchmark-max-time={args.bench_time}", "--benchmark-min-rounds=5",
                    f"--benchmark-json={bench_json}"], os.path.join(args.out, "bench.log"),
                   dict(env, SPOTTUNE_BENCH="targets"))
    summary["bench"] = {"rc": rc, "seconds": round(secs, 1)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not os.path.exists(bench_json):
        print(tail(os.path.join(args.out, "bench.log"), 40))
        sys.exit(1)

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import report

    with open(bench_json) as f:
        text = report.render(json.load(f), f"GPU: {summary['gpu']}, torch {summary['torch']}")
    with open(os.path.join(args.out, "gpu_report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
