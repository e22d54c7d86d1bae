"""The GPU check: steps for a machine with an NVIDIA GPU, each one call that fits 8 minutes.

    python bench/gpu_check.py STEP [STEP ...] [--out DIR] [--timeout SECONDS]

Steps, in the order `all` runs them (run from the repository root; each writes its log, its JSON and
the updated summary.json under --out, $OUT or bench/gpu_results, as it goes, so a step cut by its
timeout still leaves what it did):

  build          the extension with this machine's torch, CUDA kernels forced on for this GPU's
                 architecture, with CUDA_HOME set to the root of the toolkit whose nvcc matches
                 torch's CUDA (the nvcc on PATH may be a wrapper script: its toolkit is found
                 through `nvcc --dryrun`), then an import check
  tests          the tests that run on the GPU (CUDA and Triton kernels, routed blocks, autocast, compile)
  suite-1, suite-2  the whole test suite (`make test`'s pytest tests/), in two halves by file name
  amp-compile    autocast (float16 with GradScaler, bfloat16) and torch.compile on the GPU: gradients
                 against float32, graphs and recompilations over 20 batches of random routes, and
                 compiled step times (converted model vs the plain model compiled the same way)
  ceilings       the device's copy bandwidth and bf16 matrix throughput
  bench-ops      bench/bench_gumbel_st.py, bench_route_ops.py, bench_routed.py
  bench-models   bench/bench_models.py at the targets' settings, eager variants
  bench-compile  bench/bench_models.py at the targets' settings, compiled variants
  bench-matrix   bench/bench_models.py's matrix (every model at 32, 64 and 224 px) and its summary
  report         gpu_report.md from the benchmark JSON files present

A step runs in its own process group, killed at --timeout (default 480 s); the build takes the
longest (the .cu files, a few minutes). Without a GPU only `build` does anything.
"""
import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "tests", "suite-1", "suite-2", "amp-compile", "ceilings", "bench-ops", "bench-models",
         "bench-compile", "bench-matrix", "report")
GPU_TESTS = "cuda or triton or autocast or compile or amp"


def _nvcc_release(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _toolkit_of_nvcc_on_path():
    """The toolkit root the nvcc on PATH runs from, wrapper scripts included (nvcc's own TOP)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_home(torch_cuda):
    """The root of a CUDA toolkit (headers and bin/nvcc) whose nvcc matches torch's CUDA version:
    $CUDA_HOME if it is one, else the toolkit of the nvcc on PATH, else /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), _toolkit_of_nvcc_on_path(), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    seen = []
    for root in candidates:
        if not root or root in seen:
            continue
        seen.append(root)
        headers = os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) or glob.glob(
            os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))
        if headers and _nvcc_release(os.path.join(root, "bin", "nvcc")) == torch_cuda:
            return root, seen
    return None, seen


class Check:
    def __init__(self, out, timeout):
        self.out, self.timeout = out, timeout
        os.makedirs(out, exist_ok=True)
        self.summary_path = os.path.join(out, "summary.json")
        self.summary = {}
        if os.path.exists(self.summary_path):
            with open(self.summary_path) as f:
                self.summary = json.load(f)

    def save(self):
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=2)
        os.replace(tmp, self.summary_path)

    def record(self, step, **fields):
        self.summary.setdefault("steps", {})[step] = fields
        self.save()
        print(f"{step}: {json.dumps(fields)}", flush=True)

    def run(self, step, cmd, env=None):
        """Runs cmd with its output in <out>/<step>.log (written as it runs); kills its process group
        at the timeout. Returns the exit status (124 on timeout)."""
        log_path = os.path.join(self.out, f"{step}.log")
        start = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
        with open(log_path) as f:
            last = [line.rstrip() for line in f.readlines()[-3:]]
        self.record(step, rc=rc, seconds=round(time.time() - start, 1), timed_out=rc == 124, last_lines=last)
        return rc


def _env(arch, home):
    env = dict(os.environ, FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 2), PYTHONUNBUFFERED="1")
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    if home:
        env["CUDA_HOME"] = home
        env["PATH"] = os.path.join(home, "bin") + os.pathsep + env.get("PATH", "")
    env.pop("TRITON_INTERPRET", None)  # on a GPU host the Triton kernels run on the GPU
    return env


def _pytest(*args):
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def _bench(check, step, files, env, select=None, selection="targets"):
    out_json = os.path.join(check.out, f"{step}.json")
    cmd = _pytest(*files, *(["-k", select] if select else []), "--benchmark-max-time=0.2",
                  "--benchmark-min-rounds=5", f"--benchmark-json={out_json}")
    return check.run(step, cmd, dict(env, SPOTTUNE_BENCH=selection))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+", choices=(*STEPS, "all"))
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "gpu_results"))
    parser.add_argument("--timeout", type=int, default=480, help="seconds per step (default 480)")
    args = parser.parse_args()
    steps = STEPS if "all" in args.steps else args.steps
    check = Check(args.out, args.timeout)

    import torch

    has_gpu = torch.cuda.is_available()
    env_info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name() if has_gpu else None}
    try:
        import triton
        env_info["triton"] = triton.__version__
    except ImportError:
        env_info["triton"] = None
    arch = "{}.{}".format(*torch.cuda.get_device_capability()) if has_gpu else os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    home, tried = cuda_home(torch.version.cuda) if torch.version.cuda else (None, [])
    env_info.update(arch=arch, cuda_home=home, cuda_home_candidates=tried)
    check.summary["environment"] = env_info
    check.save()
    print("environment:", json.dumps(env_info), flush=True)
    env = _env(arch, home)

    for step in steps:
        if step == "build":
            if home is None:
                check.record("build", rc=1, error=f"no CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                                                  f"among {tried}; set CUDA_HOME to its root")
                sys.exit(1)
            if check.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], env):
                sys.exit(1)
            check.run("import", [sys.executable, "-c", "import spottune_ext, spottune_ext._ext as e; "
                                 "assert e.WITH_CUDA, 'built without CUDA kernels'; print('CUDA kernels:', e.WITH_CUDA)"], env)
            continue
        if not has_gpu:
            print(f"{step}: no GPU visible, skipped", flush=True)
            continue
        if step == "tests":
            check.run(step, _pytest("tests/", "-k", GPU_TESTS, "--maxfail=20", f"--junitxml={check.out}/tests.xml"), env)
        elif step in ("suite-1", "suite-2"):
            files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
            half = files[: len(files) // 2] if step == "suite-1" else files[len(files) // 2:]
            check.run(step, _pytest(*half, f"--junitxml={check.out}/{step}.xml"), env)
        elif step == "amp-compile":
            check.run(step, [sys.executable, os.path.join(ROOT, "bench", "gpu_amp_compile.py"),
                             "--out", os.path.join(check.out, "amp_compile.json")], env)
        elif step == "ceilings":
            check.run(step, [sys.executable, os.path.join(ROOT, "bench", "gpu_amp_compile.py"), "--ceilings",
                             "--out", os.path.join(check.out, "ceilings.json")], env)
        elif step == "bench-ops":
            _bench(check, step, ["bench/bench_gumbel_st.py", "bench/bench_route_ops.py", "bench/bench_routed.py"], env)
        elif step == "bench-models":
            _bench(check, step, ["bench/bench_models.py"], env, "not compile")
        elif step == "bench-compile":
            _bench(check, step, ["bench/bench_models.py"], env, "compile and not memory")
        elif step == "bench-matrix":
            if not _bench(check, step, ["bench/bench_models.py"], env, selection="matrix"):
                check.run("matrix-summary", [sys.executable, os.path.join(ROOT, "bench", "matrix.py"),
                                             os.path.join(check.out, f"{step}.json"), "--out",
                                             os.path.join(check.out, "matrix_gpu.md")], env)
        elif step == "report":
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            import report

            parts = []
            for name in ("bench-ops", "bench-models", "bench-compile"):
                path = os.path.join(check.out, f"{name}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        parts.append(report.render(json.load(f), f"{name}, {env_info['gpu']}, torch {env_info['torch']}"))
            matrix = os.path.join(check.out, "matrix_gpu.md")
            if os.path.exists(matrix):
                with open(matrix) as f:
                    parts.append(f"## Image sizes and models, {env_info['gpu']}\n\n{f.read()}")
            with open(os.path.join(check.out, "gpu_report.md"), "w") as f:
                f.write("\n\n".join(parts))
            check.record("report", files=len(parts))


if __name__ == "__main__":
    main()
