"""End to end: whole SpotTune models (spottune_ext.convert) against the plain model and fine-tuning.

Models (random weights): torchvision resnet18, resnet50, mobilenet_v2 and spottune_ext.models.resnet26, every
block routed, the default policy network (sized to its backbone, spottune_ext.convert). CPU: float32,
batches 16 and 8 at 112x112. GPU: bf16, channels_last, batches 256 and 64 at 224x224. The "matrix"
selection sets its own sizes and batches.

Executions (the "impl" of each benchmark; one group per model, batch, routed fraction and measure):
  plain          : the pre-trained model, no routing, no policy (the floor); inference only.
  plain+policy   : the plain model plus the policy network's forward (what a routed model with all
                   images on one copy can at best cost); inference only.
  policy         : the policy network alone: its forward (inference), its forward and backward
                   (training step, decisions sampled as in training); "matrix" only.
  split          : the floor of grouped execution at fraction 0.5 without its routing: two plain models
                   with separate weights (a frozen and a fine-tuned one), each on half of the batch (the
                   sub-batch sizes every routed block sees), plus the policy network. In training the
                   same work as grouped execution's exact gradient: the fine-tuned model trains, the
                   frozen one passes its input gradient back, each half also goes through the other
                   model under no_grad (the other copy's forward), the policy gets its gradient.
                   "matrix" only.
  finetune       : standard fine-tuning, every parameter of the plain model trained; training only.
  dense          : SpotTune as the authors run it (execution="dense": both copies on the whole batch).
  grouped_torch  : SpotTune grouped (each image through its chosen copy only), plain-torch row ops.
  grouped        : SpotTune grouped with the project's row-op kernels (backend "cpp" on CPU, "cuda" on GPU).
  <impl>+compile : the same under torch.compile(fullgraph=True), every variant compiled the same way (on
                   the CPU with inductor's layout optimisation off, as routed blocks need: README);
                   every execution in the "full" selection and in "targets" on GPU; in "targets" on CPU
                   only plain, finetune and grouped at fraction 0.5 (compiling takes minutes per
                   variant there); not in the quick pass. A variant that fails to compile is reported
                   as skipped with the compiler's error.

Routed fraction (the "fraction" of each group): 0, 0.25, 0.5, 0.75, 1 are fixed decisions (in every
block exactly round(f * B) random images take the fine-tuned copy), the same for every execution so
that each does the same work; the policy network still runs in every SpotTune timing, its decisions
replaced by the fixed ones (values fixed, straight-through gradient kept, so training also
back-propagates into the policy). "policy" lets the policy decide (eval: argmax; training: Gumbel
samples); extra_info["routed_fraction"] is the fraction it routed.

Measures:
  inference   : no_grad forward in eval mode; extra_info["images_per_s"] = batch / median time.
  train-step  : forward + cross-entropy + backward (no optimizer step), every BatchNorm in eval mode,
                gradients cleared before each step.
  train-memory: peak memory of one training step after a warm-up step, extra_info["peak_mib"] (the
                report's metric for this group): the CUDA allocator's max_memory_allocated on GPU, the
                profiler's allocation record on CPU (bench/_common.py); weights are not counted.

Selection (SPOTTUNE_BENCH): unset = the quick pass of `make test` (resnet18, fraction 0.5, the small
batch, 64x64 images on CPU); "targets" = what the targets below need (resnet50, the large batch, fractions 0, 0.5, 1),
and mobilenet_v2 next to it (large batch, fraction 0.5); "matrix" = the sizes SpotTune is used at: every
model at 32x32 and 64x64 (batch 32 on CPU, 128 on GPU) and 224x224 (batch 16 on CPU, 64 on GPU), fraction
0.5, inference and training step of plain, plain+policy, policy, finetune, dense and grouped (bench/matrix.py
summarises it); "full" = every model, batch, fraction and execution at the default size (`make bench-full`;
hours on a 2-core CPU).

Targets (extra_info["targets"], marked by bench/report.py), resnet50, large batch, grouped vs the others:
  CPU (batch 16, 112x112): at 0.5, inference <= 0.6x dense, training step <= 0.65x dense, faster than
  grouped_torch in both; at 0 and 1, inference <= 1.03x plain+policy. Compiled, at 0.5: training step
  (grouped+compile) <= 1.25x standard fine-tuning compiled the same way (finetune+compile).
  GPU (H200, bf16, channels_last, batch 256, 224x224): at 0.5, inference <= 0.556x dense (1.8x the
  throughput) and <= 1/0.85x plain+policy, training step <= 1/1.5x dense, peak memory <= 0.65x dense.
  Matrix, CPU, every model and size: training step <= 0.75x dense and <= 1.35x finetune (1.25x at
  224x224), inference <= 1.10x plain+policy, the policy's training step <= 0.10x finetune; and the
  routing's own overhead: training step and inference <= 1.10x split.

cuDNN autotuning: grouped execution gives each routed conv a data-dependent sub-batch size, and with
torch.backends.cudnn.benchmark on every new size would be autotuned again inside the timed steps. The
benchmarks therefore run with cudnn.benchmark off (cuDNN's heuristics pick the algorithm, no
autotuning), for every execution alike; CUDA timings synchronise the device inside the timed call.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import mobilenet_v2, resnet18, resnet50

import spottune_ext
from _common import peak_bytes, synchronize

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
MEMORY_FORMAT = torch.channels_last if HAS_CUDA else torch.contiguous_format
SIZE = 224 if HAS_CUDA else 112
LARGE, SMALL = (256, 64) if HAS_CUDA else (16, 8)
KERNELS = "cuda" if HAS_CUDA else "cpp"
SEED, NUM_CLASSES = 0, 10
SELECTION = os.environ.get("SPOTTUNE_BENCH", "quick")
if SELECTION not in ("quick", "targets", "matrix", "full"):
    raise ValueError(f"SPOTTUNE_BENCH must be unset, 'targets', 'matrix' or 'full', got {SELECTION!r}")
if SELECTION == "quick" and not HAS_CUDA:
    SIZE = 64  # keeps `make test` short on a small CPU

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "resnet26": spottune_ext.models.resnet26, "mobilenet_v2": mobilenet_v2}
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0, "policy")
SPOTTUNE = {"dense": ("dense", "auto"), "grouped_torch": ("grouped", "torch"), "grouped": ("grouped", KERNELS)}
INFERENCE_IMPLS = ["plain", "plain+policy", *SPOTTUNE]
TRAIN_IMPLS = ["finetune", *SPOTTUNE]
if SELECTION == "matrix":
    INFERENCE_IMPLS = ["plain", "plain+policy", "policy", "split", "dense", "grouped"]
    TRAIN_IMPLS = ["finetune", "policy", "split", "dense", "grouped"]
COMPILE = SELECTION == "full" or (HAS_CUDA and SELECTION == "targets")
if COMPILE:
    INFERENCE_IMPLS += [f"{impl}+compile" for impl in INFERENCE_IMPLS]
    TRAIN_IMPLS += [f"{impl}+compile" for impl in TRAIN_IMPLS]
# On the CPU, "targets" compiles only what the compiled target and its comparison need, at fraction 0.5.
CPU_COMPILED = ({"inference": ["plain+compile", "grouped+compile"], "train": ["finetune+compile", "grouped+compile"]}
                if SELECTION == "targets" and not HAS_CUDA else {"inference": [], "train": []})
# Compiled on the CPU: inductor's layout optimisation off (README: torch.compile, limits).
COMPILE_OPTIONS = None if HAS_CUDA else {"layout_optimization": False}

# (model, batch, image size, fraction)
if SELECTION == "full":
    CASES = [(m, b, SIZE, f) for m in MODELS for b in (LARGE, SMALL) for f in FRACTIONS]
elif SELECTION == "targets":
    CASES = [("resnet50", LARGE, SIZE, f) for f in (0.0, 0.5, 1.0)] + [("mobilenet_v2", LARGE, SIZE, 0.5)]
elif SELECTION == "matrix":
    SMALL_IMAGES, LARGE_IMAGES = (128, 64) if HAS_CUDA else (32, 16)  # batches at 32/64 px and at 224 px
    CASES = [(m, b, s, 0.5) for m in MODELS for s, b in ((32, SMALL_IMAGES), (64, SMALL_IMAGES), (224, LARGE_IMAGES))]
else:
    CASES = [("resnet18", SMALL, SIZE, 0.5)]


def _targets(impl, measure, model, batch, fraction, size):
    """The targets of the grouped execution, compiled or not, in this group (see the module docstring)."""
    if SELECTION == "matrix":
        if HAS_CUDA:
            return []
        if impl == "policy" and measure == "train-step":
            return [{"vs": "finetune", "max_ratio": 0.10}]
        if impl == "grouped" and measure == "train-step":
            return [{"vs": "dense", "max_ratio": 0.75}, {"vs": "finetune", "max_ratio": 1.25 if size >= 224 else 1.35},
                    {"vs": "split", "max_ratio": 1.10}]
        if impl == "grouped" and measure == "inference":
            return [{"vs": "plain+policy", "max_ratio": 1.10}, {"vs": "split", "max_ratio": 1.10}]
        return []
    if impl not in ("grouped", "grouped+compile") or model != "resnet50" or batch != LARGE:
        return []
    if impl == "grouped+compile":
        if not HAS_CUDA and fraction == 0.5 and measure == "train-step":
            return [{"vs": "finetune+compile", "max_ratio": 1.25}]
        return []
    if not HAS_CUDA:
        if fraction == 0.5 and measure == "inference":
            return [{"vs": "dense", "max_ratio": 0.6}, {"vs": "grouped_torch", "max_ratio": 1.0}]
        if fraction == 0.5 and measure == "train-step":
            return [{"vs": "dense", "max_ratio": 0.65}, {"vs": "grouped_torch", "max_ratio": 1.0}]
        if fraction in (0.0, 1.0) and measure == "inference":
            return [{"vs": "plain+policy", "max_ratio": 1.03}]
        return []
    if fraction != 0.5:
        return []
    return {"inference": [{"vs": "dense", "max_ratio": 0.556}, {"vs": "plain+policy", "max_ratio": round(1 / 0.85, 3)}],
            "train-step": [{"vs": "dense", "max_ratio": round(1 / 1.5, 3)}],
            "train-memory": [{"vs": "dense", "max_ratio": 0.65, "metric": "peak_mib"}]}[measure]


@pytest.fixture(scope="module", autouse=True)
def no_cudnn_autotuning():
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    yield
    torch.backends.cudnn.benchmark = previous


class _Case:
    """One model at one batch size: the plain model, its SpotTune conversions (built once), the data."""

    def __init__(self, model_name, batch, size):
        torch.manual_seed(SEED)
        plain = MODELS[model_name]()
        self.plain = plain.to(DEVICE, DTYPE, memory_format=MEMORY_FORMAT).eval()
        self.other = copy.deepcopy(self.plain) if "split" in INFERENCE_IMPLS else None  # split's second model
        self.spottune = {}
        for impl, (execution, backend) in SPOTTUNE.items():
            torch.manual_seed(SEED)  # the same policy weights in every execution
            self.spottune[impl] = spottune_ext.convert(plain, execution=execution, backend=backend).eval()
        g = torch.Generator().manual_seed(SEED)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(DEVICE, DTYPE, memory_format=MEMORY_FORMAT)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(DEVICE)
        num_routed = self.spottune["grouped"].num_routed
        self.fixed = {}
        for fraction in FRACTIONS[:-1]:
            ranks = torch.rand(batch, num_routed, generator=g).argsort(0).argsort(0)
            self.fixed[fraction] = (ranks < round(fraction * batch)).to(DEVICE, DTYPE)


_CACHE = {}


def _case(model_name, batch, size):
    if (model_name, batch, size) not in _CACHE:
        _CACHE.clear()  # one model in memory at a time
        _CACHE[(model_name, batch, size)] = _Case(model_name, batch, size)
    return _CACHE[(model_name, batch, size)]


def _spottune_forward(model, x, fixed):
    """Logits with the policy run; `fixed` (or None for the policy's own) replaces its decisions."""
    if fixed is None:
        return model(x)
    decided = model.decide(x)
    return model(x, fixed + (decided - decided.detach()))


def _maybe_compile(fn, impl):
    if not impl.endswith("+compile"):
        return fn
    compiled = torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS)

    def call():
        try:
            return compiled()
        except Exception as err:  # noqa: BLE001 - any compiler failure means "does not compile"
            pytest.skip(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    return call


def _inference_fn(case, impl, fraction):
    base = impl.removesuffix("+compile")
    fixed = None if fraction == "policy" else case.fixed[fraction]
    if base == "plain":
        fn = lambda: case.plain(case.x)  # noqa: E731
    elif base == "plain+policy":
        policy = case.spottune["grouped"].policy.eval()
        fn = lambda: (case.plain(case.x), policy(case.x))  # noqa: E731
    elif base == "policy":
        policy = case.spottune["grouped"].policy.eval()
        fn = lambda: policy(case.x)  # noqa: E731
    elif base == "split":
        policy = case.spottune["grouped"].policy.eval()
        fn = lambda: (_split_forward(case.plain, case.other, case.x), policy(case.x))  # noqa: E731
    else:
        model = case.spottune[base].eval()
        fn = lambda: _spottune_forward(model, case.x, fixed)  # noqa: E731
    return _maybe_compile(fn, impl)


def _split_forward(first, second, x):
    half = round(0.5 * x.shape[0])
    return torch.cat([first(x[:half]), second(x[half:])])


def _train_setup(case, impl, fraction):
    """(model, clear_grads, step) for one training step: forward + loss + backward, BatchNorm in eval."""
    base = impl.removesuffix("+compile")
    fixed = None if fraction == "policy" else case.fixed[fraction]
    if base == "finetune":
        model = copy.deepcopy(case.plain).requires_grad_(True).eval()
        forward = lambda: model(case.x)  # noqa: E731
    elif base == "split":
        model = torch.nn.ModuleDict({"frozen": copy.deepcopy(case.plain).requires_grad_(False),
                                     "tuned": copy.deepcopy(case.other).requires_grad_(True),
                                     "policy": case.spottune["grouped"].policy}).train()

        def forward():
            decided, half = model["policy"](case.x), round(0.5 * case.x.shape[0])
            # The frozen half passes its input gradient back, as a frozen copy inside a network does.
            frozen_half = case.x[:half].detach().requires_grad_(True)
            out = torch.cat([model["frozen"](frozen_half), model["tuned"](case.x[half:])])
            with torch.no_grad():  # the other copy's forward that the decisions' gradient needs
                model["frozen"](case.x[half:]), model["tuned"](case.x[:half])
            return out + (decided - decided.detach()).sum()
    elif base == "policy":  # its decisions (sampled) and their straight-through gradient into the policy
        model = case.spottune["grouped"].policy.train()
        forward = lambda: model(case.x)[:, :, None].expand(-1, -1, NUM_CLASSES).sum(1)  # noqa: E731
    else:
        model = case.spottune[base].train()
        forward = lambda: _spottune_forward(model, case.x, fixed)  # noqa: E731
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = _maybe_compile(lambda: F.cross_entropy(forward()[:, :NUM_CLASSES].float(), case.labels), impl)

    def clear_grads():
        for p in params:
            p.grad = None

    def step():
        loss_fn().backward()
        synchronize(DEVICE)

    return model, clear_grads, step


def _record(benchmark, impl, measure, model_name, batch, size, fraction):
    benchmark.group = f"{model_name} {size}px b{batch} fraction {fraction}: {measure}"
    benchmark.extra_info.update(impl=impl, baseline="dense", model=model_name, batch=batch, size=size,
                                fraction=fraction, measure=measure, dtype=str(DTYPE).removeprefix("torch."),
                                targets=_targets(impl, measure, model_name, batch, fraction, size))


def _routed_fraction(case, impl, fraction):
    if fraction != "policy" or impl not in SPOTTUNE:
        return fraction
    return round(float(case.spottune[impl].last_policy.float().mean()), 4)


def _cases(impls, compiled=()):
    return [pytest.param(m, b, s, f, impl, id=f"{m}-{s}px-b{b}-{f}-{impl}") for m, b, s, f in CASES
            for impl in (*impls, *(compiled if f == 0.5 else ()))]


@pytest.mark.parametrize("model_name, batch, size, fraction, impl", _cases(INFERENCE_IMPLS, CPU_COMPILED["inference"]))
def test_inference(benchmark, model_name, batch, size, fraction, impl):
    case = _case(model_name, batch, size)
    _record(benchmark, impl, "inference", model_name, batch, size, fraction)
    fn = _inference_fn(case, impl, fraction)

    def run():
        out = fn()
        synchronize(DEVICE)
        return out

    with torch.no_grad():
        run()  # warm-up (and compilation)
        out = benchmark(run)
    logits = out[0] if impl.startswith(("plain+policy", "split")) else out  # the policy alone: its decisions
    assert logits.shape[0] == batch and torch.isfinite(logits.float()).all()
    benchmark.extra_info["routed_fraction"] = _routed_fraction(case, impl, fraction)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("model_name, batch, size, fraction, impl", _cases(TRAIN_IMPLS, CPU_COMPILED["train"]))
def test_train_step(benchmark, model_name, batch, size, fraction, impl):
    case = _case(model_name, batch, size)
    _record(benchmark, impl, "train-step", model_name, batch, size, fraction)
    model, clear_grads, step = _train_setup(case, impl, fraction)

    def run():
        clear_grads()
        step()

    run()  # warm-up (and compilation)
    benchmark(run)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) or fraction in (0.0, 1.0, "policy")
    benchmark.extra_info["routed_fraction"] = _routed_fraction(case, impl, fraction)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("model_name, batch, size, fraction, impl",
                         [] if SELECTION == "matrix" else _cases(TRAIN_IMPLS))
def test_train_step_peak_memory(benchmark, model_name, batch, size, fraction, impl):
    case = _case(model_name, batch, size)
    _record(benchmark, impl, "train-memory", model_name, batch, size, fraction)
    model, clear_grads, step = _train_setup(case, impl, fraction)
    clear_grads()
    step()  # warm-up: one-time allocations (and compilation) are not the step's

    def measure():
        clear_grads()
        return peak_bytes(step, DEVICE)

    peak = benchmark.pedantic(measure, rounds=1, iterations=1)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    benchmark.extra_info.update(metric="peak_mib", peak_mib=round(peak / 2**20, 1), weights_mib=round(weights / 2**20, 1))
    assert peak > 0
