"""Autocast and torch.compile of a converted model on the GPU (a step of bench/gpu_check.py).

    python bench/gpu_amp_compile.py --out FILE.json [--device cuda] [--tiny] [--ceilings]

Writes FILE.json after every measurement:
  autocast: for float16 (with a GradScaler) and bfloat16, one training step under autocast against
      float32 with the same routes: relative error norms of the logits and of every trainable
      parameter's gradient, whether the decision gradient is finite, and three GradScaler steps.
  compile: torch.compile(model, fullgraph=True) in training and in evaluation over 20 batches of random
      routes: graphs compiled after the first batch and after the last, and the largest difference
      to eager; then median step times of the compiled converted model (50 % routing, its policy
      running) and of the plain model's compiled fine-tuning step, and their ratio.
--ceilings instead measures the device's copy bandwidth and bf16 matrix throughput.
--tiny: a ResNet-26 of widths 8/16/16 at 16x16 (a quick run on any device, CPU included).
"""
import argparse
import contextlib
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torchvision.models import resnet18

import spottune_ext as st
from spottune_ext.models.resnet26 import DecathlonResNet


class Results:
    def __init__(self, path):
        self.path, self.data = path, {}

    def put(self, key, value):
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)
        print(key, json.dumps(value), flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, reps):
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ceilings(results):
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src), torch.device("cuda"), 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = _median_time(lambda: a @ b, torch.device("cuda"), 20)
    results.put("ceilings", {"copy_GBps": round(2 * n / copy_s / 1e9, 1),
                             "bf16_matmul_TFLOPs": round(2 * 8192**3 / mm_s / 1e12, 1)})


def _setup(tiny, device):
    torch.manual_seed(0)
    if tiny:
        backbone, size, batch = DecathlonResNet(10, (1, 1, 1), (8, 16, 16), 8), 16, 8
        policy = {"widths": (8, 16), "stem_width": 8}
    else:
        backbone, size, batch = resnet18(num_classes=10), 112, 64
        policy = {"input_size": 56}
    model = st.convert(backbone, policy=policy).to(device)
    return backbone.to(device), model, size, batch


def _rel(a, b):
    return round(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item(), 5)


def _amp_step(model, x, y, d, dtype, scaler=None):
    model.zero_grad(set_to_none=True)
    d = d.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
        logits = model(x, d)
        loss = F.cross_entropy(logits.float(), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    scale = scaler.get_scale() if scaler is not None else 1.0
    grads = {n: p.grad.float() / scale for n, p in model.named_parameters() if p.grad is not None}
    return logits, d.grad.float() / scale, grads


def autocast_checks(results, model, size, batch, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    d = torch.randint(0, 2, (batch, model.num_routed), generator=g).float().to(device)
    expected = _amp_step(copy.deepcopy(model), x, y, d, None)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        try:
            m = copy.deepcopy(model)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            logits, dgrad, grads = _amp_step(m, x, y, d, dtype, scaler)
            flat = torch.cat([grads[n].flatten() for n in expected[2]])
            flat_expected = torch.cat([expected[2][n].flatten() for n in expected[2]])
            entry = {"logits_dtype": str(logits.dtype), "logits_rel_error": _rel(logits, expected[0]),
                     "grad_rel_error": _rel(flat, flat_expected), "decision_grad_rel_error": _rel(dgrad, expected[1]),
                     "decision_grad_finite": bool(torch.isfinite(dgrad).all())}
            if scaler is not None:  # a few optimizer steps: the scaler must not skip them all
                opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
                for _ in range(3):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=dtype):
                        loss = F.cross_entropy(m(x).float(), y)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                entry["scaler_scale_after_3_steps"] = scaler.get_scale()
            results.put(f"autocast_{name}", entry)
        except Exception as err:  # noqa: BLE001 - recorded, the next checks still run
            results.put(f"autocast_{name}", {"error": f"{type(err).__name__}: {err}"[:500]})


def compile_checks(results, backbone, model, size, batch, device, batches=20):
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, 2, (batch, model.num_routed), generator=g).float().to(device)) for _ in range(batches)]
    # On the CPU inductor's layout optimisation must be off for routed blocks (README); CUDA skips it.
    def layout():
        return torch._inductor.config.patch(layout_optimization=False) if device.type == "cpu" else contextlib.nullcontext()

    for train in (True, False):
        key = "compile_train" if train else "compile_eval"
        try:
            torch._dynamo.reset()
            m = copy.deepcopy(model).train(train)
            eager = copy.deepcopy(m)
            counter = CompileCounterWithBackend("inductor")
            compiled = torch.compile(m, backend=counter, fullgraph=True)
            worst, after_first, start = 0.0, None, time.perf_counter()
            for i, (x, d) in enumerate(data):
                with torch.set_grad_enabled(train), layout():
                    out, ref = compiled(x, d), eager(x, d)
                    if train:
                        out.sum().backward()
                        ref.sum().backward()
                worst = max(worst, _rel(out.detach(), ref.detach()))
                if i == 0:
                    after_first = counter.frame_count
            results.put(key, {"graphs_after_first_batch": after_first, "graphs_after_all": counter.frame_count,
                              "batches": batches, "max_rel_diff_to_eager": worst,
                              "seconds_with_compilation": round(time.perf_counter() - start, 1)})
        except Exception as err:  # noqa: BLE001
            results.put(key, {"error": f"{type(err).__name__}: {err}"[:500]})

    # Timings: the converted model's compiled training step at 50 % routing (policy running, its
    # decisions replaced as in bench/bench_models.py) vs the plain model's compiled fine-tuning step.
    try:
        torch._dynamo.reset()
        x, _ = data[0]
        y = torch.randint(0, 10, (batch,), device=device)
        ranks = torch.rand(batch, model.num_routed, generator=g).argsort(0).argsort(0)
        fixed = (ranks < batch // 2).float().to(device)
        converted = copy.deepcopy(model).train()
        plain = copy.deepcopy(backbone).train().requires_grad_(True)
        for net in (converted, plain):
            for mod in net.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()

        def routed_loss():
            decided = converted.decide(x)
            return F.cross_entropy(converted(x, fixed + (decided - decided.detach())), y)

        options = {"layout_optimization": False} if device.type == "cpu" else None
        steps = {"grouped": (converted, torch.compile(routed_loss, fullgraph=True, options=options)),
                 "finetune": (plain, torch.compile(lambda: F.cross_entropy(plain(x), y), fullgraph=True, options=options))}
        timings = {}
        for name, (net, loss_fn) in steps.items():
            def step():
                net.zero_grad(set_to_none=True)
                loss_fn().backward()
            timings[f"{name}_compiled_step_ms"] = round(1e3 * _median_time(step, device, 10), 3)
        timings["ratio"] = round(timings["grouped_compiled_step_ms"] / timings["finetune_compiled_step_ms"], 3)
        results.put("compiled_step_times", {"batch": batch, "size": size, "routing": 0.5, **timings})
    except Exception as err:  # noqa: BLE001
        results.put("compiled_step_times", {"error": f"{type(err).__name__}: {err}"[:500]})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ceilings", action="store_true")
    args = parser.parse_args()
    results = Results(args.out)
    if args.ceilings:
        ceilings(results)
        return
    device = torch.device(args.device)
    backbone, model, size, batch = _setup(args.tiny, device)
    results.put("setup", {"device": str(device), "model": "tiny resnet26" if args.tiny else "resnet18",
                          "batch": batch, "size": size, "routed_blocks": model.num_routed})
    autocast_checks(results, model, size, batch, device)
    compile_checks(results, backbone, model, size, batch, device, batches=5 if args.tiny else 20)


if __name__ == "__main__":
    main()
