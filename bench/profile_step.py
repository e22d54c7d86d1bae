"""Where a grouped SpotTune training step spends its time, against standard fine-tuning (CPU profiler).

    python bench/profile_step.py [--size 64] [--batch 32] [--models resnet18 mobilenet_v2] [--out PROFILE.md]

Each model (random weights, every block routed, the default policy, BatchNorm in eval mode as in
bench_models.py) takes training steps at 50 % routing from fixed random decisions, the policy run as
in training. The forward and the backward pass are profiled apart (torch.profiler, self CPU time of
every op, median step of --steps) and each op is put in a category by its name. In the backward pass
the forward ops (convolutions, BatchNorm, ...) are the recomputation of the other copy that the
decisions' gradient needs; the "*_backward" ops are the backward proper. The policy network's own
forward and backward are profiled alone and reported as one more line.
"""
import argparse
import copy
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.profiler import ProfilerActivity, profile
from torchvision.models import mobilenet_v2, resnet18, resnet50

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spottune_ext  # noqa: E402

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
          "resnet26": lambda: spottune_ext.models.resnet26(1000)}
# (category, substrings of the op name), first match wins; "other" takes the rest.
CATEGORIES = [
    ("route plan", ("route_plan", "route_sizes")),
    ("row gather / combine", ("gather_rows", "combine_rows", "index_select", "index_copy", "index_add", "index_put",
                              "scatter", "aten::gather", "aten::cat", "aten::stack")),
    ("convolution backward", ("convolution_backward",)),
    ("convolution", ("conv", "mkldnn_convolution", "aten::addmm", "aten::mm", "aten::linear")),
    ("BatchNorm backward", ("batch_norm_backward",)),
    ("BatchNorm", ("batch_norm",)),
    ("Gumbel decision", ("gumbel",)),
    ("copies, views, allocation", ("aten::copy_", "aten::empty", "aten::zeros", "aten::clone", "aten::contiguous",
                                   "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::view",
                                   "aten::as_strided", "aten::reshape", "aten::permute", "aten::expand")),
]
PHASES = ("forward", "backward")


def category(name):
    for title, keys in CATEGORIES:
        if any(k in name for k in keys):
            return title
    return "other"


def profiled(fn):
    """{category: self CPU seconds} of one call of fn."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = defaultdict(float)
    for event in prof.key_averages():
        out[category(event.key)] += event.self_cpu_time_total / 1e6
    return out


def median_profile(make_step, steps):
    """{phase: {category: median seconds}} over `steps` profiled steps (after one warm-up)."""
    runs = {phase: [] for phase in PHASES}
    make_step()
    for _ in range(steps):
        holder = {}
        runs["forward"].append(profiled(lambda: holder.update(loss=make_step(backward=False))))
        runs["backward"].append(profiled(lambda: holder["loss"].backward()))
    return {phase: {c: statistics.median(r.get(c, 0.0) for r in runs[phase])
                    for c in {c for r in runs[phase] for c in r}} for phase in PHASES}


def steps_for(name, batch, size):
    torch.manual_seed(0)
    plain = MODELS[name]().eval()
    model = spottune_ext.convert(plain, num_classes=10).train()
    finetune = copy.deepcopy(plain).requires_grad_(True)
    for net in (model, finetune):
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    ranks = torch.rand(batch, model.num_routed, generator=g).argsort(0).argsort(0)
    fixed = (ranks < batch // 2).float()

    def grouped(backward=True):
        for p in model.parameters():
            p.grad = None
        decided = model.decide(x)
        loss = F.cross_entropy(model(x, fixed + (decided - decided.detach())), labels)
        return loss.backward() if backward else loss

    def plain_step(backward=True):
        for p in finetune.parameters():
            p.grad = None
        loss = F.cross_entropy(finetune(x)[:, :10], labels)
        return loss.backward() if backward else loss

    policy = model.policy

    def policy_step(backward=True):
        for p in policy.parameters():
            p.grad = None
        loss = policy.train()(x).sum()
        return loss.backward() if backward else loss

    return {"grouped": grouped, "finetune": plain_step, "policy": policy_step}


def render(results, size, batch, steps):
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = [f"Self CPU time per training step, ms (median of {steps} profiled steps), {size}x{size}, batch {batch}, "
             f"50 % routing, {torch.get_num_threads()} threads, torch {torch.__version__}.", ""]
    for name, prof in results.items():
        grouped, finetune, policy = prof["grouped"], prof["finetune"], prof["policy"]
        total = {k: sum(sum(p[ph].values()) for ph in PHASES) for k, p in prof.items()}
        lines += [f"**{name}**: grouped step {1e3 * total['grouped']:.1f} ms, fine-tuning step "
                  f"{1e3 * total['finetune']:.1f} ms ({total['grouped'] / total['finetune']:.2f}x); the policy alone "
                  f"{1e3 * total['policy']:.1f} ms ({total['policy'] / total['finetune']:.2f}x fine-tuning), included "
                  f"in the grouped step.", "",
                  "| category | grouped forward | grouped backward | fine-tuning forward | fine-tuning backward |",
                  "|---|---|---|---|---|"]
        for c in cats:
            row = [grouped["forward"].get(c, 0), grouped["backward"].get(c, 0), finetune["forward"].get(c, 0),
                   finetune["backward"].get(c, 0)]
            if max(row) >= 5e-5:
                lines.append(f"| {c} | " + " | ".join(f"{1e3 * v:.1f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"], choices=list(MODELS))
    parser.add_argument("--out", help="write the markdown here instead of printing it")
    args = parser.parse_args(argv)
    results = {}
    for name in args.models:
        steps = steps_for(name, args.batch, args.size)
        results[name] = {k: median_profile(fn, args.steps) for k, fn in steps.items()}
    text = render(results, args.size, args.batch, args.steps)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
