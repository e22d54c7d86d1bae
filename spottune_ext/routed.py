"""Routed residual blocks: SpotTune's frozen and fine-tuned copies of a block, with per-image routing.

A routed block holds two copies of a torchvision block: ``frozen`` (the given block itself, its
parameters set to requires_grad=False) and ``tuned`` (a deep copy with its own storage, trainable).
Each copy is a main branch (convs and BatchNorms), a shortcut (the identity, the copy's own
downsample, or none) and, for ResNet blocks, a final ReLU. The whole block is routed: image b goes
through ``tuned`` when decision[b] == 1 and through ``frozen`` when decision[b] == 0, downsample and
final ReLU included. With every decision 0 the output is bit for bit that of the original block.

Execution (``execution``, settable at any time):

* ``"grouped"`` (default): the batch is split by route (spottune_ext.route_plan), the input rows are
  permuted once (gather_rows) so that each copy runs on a contiguous sub-batch (a view, no
  copy), and both results are written back with one combine_rows, which also does the identity
  shortcut's add and the final ReLU (with a downsample, each copy adds its own shortcut to its
  main branch first and the combine does the ReLU). Without autograd each image is computed once, through its
  chosen copy only; when every image takes one route the block runs that copy directly.
  With autograd the values and the gradients to the input and to the weights are those of the
  chosen copy (the other copy's coefficient is exactly 0). The decision gets the gradient
  <g, F^(x) - F(x)> per image, g being the gradient arriving at the block's output; it needs the
  other copy's output for each image, which is computed in the backward pass under no_grad (no
  activations kept, no backward through it, no extra memory between forward and backward) and
  under the forward's autocast state, and only when the decision requires grad. When grad mode is on, a copy that no image chose still runs
  on its empty sub-batch, so its trainable parameters get a (zero) gradient and
  DistributedDataParallel needs no find_unused_parameters.
* ``"dense"``: the authors' masked execution, y = I * F^(x) + (1 - I) * F(x), both copies on the
  whole batch (twice the compute). Kept as the reference and the benchmark baseline. It accepts any
  decision values (the mask formula) and does not check them.

BatchNorm (the one place where the two executions can differ; they agree exactly with BatchNorm in
eval mode):

* The tuned copy follows the module's train/eval mode. In train mode, grouped execution normalises
  each image with the images routed to the same copy (the sub-batch) and updates the running
  statistics from that sub-batch; dense execution normalises over the whole batch.
* ``frozen_bn="eval"`` (default): the frozen copy is truly frozen: it stays in eval mode (running
  statistics, never updated) whatever the module's mode. ``frozen_bn="train"`` reproduces the
  authors: the frozen copy's BatchNorm layers follow the module's mode (batch statistics over the
  frozen sub-batch, running statistics updated) and their affine parameters are trainable; its
  conv weights stay frozen.
* A sub-batch with at most one value per channel at a BatchNorm layer (one image at 1x1 spatial
  size, or an empty sub-batch) has no batch statistics: that layer uses its running statistics for
  that call, and does not update them.
* The other-copy forward used for the decision gradient follows the same rules on the same
  sub-batches but never updates running statistics. It runs in the backward pass with the
  parameters and running statistics the block has then.

BatchNorm layers must track running statistics and sit directly in the block or in nn.Sequential
containers (as in torchvision), so that these rules reach them.

Whole backbones: ``run_blocks(modules, x, decisions)`` plans every routed block at once
(route_plan with chain=True, one host copy of the sub-batch sizes per forward), permutes the input
once, and lets each routed block write its output rows straight into the order the next routed
block wants; the last one writes batch order. Modules between routed blocks see rows in permuted
order, which per-sample layers and BatchNorm statistics do not notice. A block whose images all take
one copy keeps batch order; without autograd, a run of such blocks executes as the plain network
(no gather, no combine).
"""
from copy import deepcopy
from typing import Iterable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import backends
from .ops import combine_rows, gather_rows, route_plan

EXECUTIONS = ("grouped", "dense")
FROZEN_BN = ("eval", "train")
IDENTITY = "identity"  # shortcut(copy) value for a parameter-free identity shortcut

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _norm(bn: _BatchNorm, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """A BatchNorm layer under the routing rules (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _traced_norm(bn, x, update_stats)
    if not bn.training:
        return bn(x)
    if x.numel() <= x.shape[1]:  # at most one value per channel: no batch statistics
        return nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if update_stats:
        return bn(x)
    return nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def _traced_norm(bn: _BatchNorm, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """_norm without a branch on the sub-batch size, which torch.compile traces as a data-dependent
    size: the batch statistics are computed whatever the size and replaced by the running ones
    (torch.where) where there is at most one value per channel; the running statistics are updated
    the same way. Computed in float32 at least, returned in x's dtype, as BatchNorm under autocast."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    acc = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(acc)
    mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
    if bn.training:
        # Values per channel, as a tensor: traced arithmetic on the size itself (torch.var_mean's
        # division included) assumes data-dependent sizes are at least 2 and fails on an empty sub-batch.
        n = torch.scalar_tensor(x.numel() // x.shape[1], dtype=acc, device=x.device)
        has_stats = n > 1
        dims = [0, *range(2, x.dim())]
        batch_mean = xs.sum(dims) / n.clamp_min(1)
        batch_var = (xs - batch_mean.view(view)).square().sum(dims) / n.clamp_min(1)
        if update_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(has_stats.long())
                momentum = 1 / bn.num_batches_tracked.clamp_min(1) if bn.momentum is None else bn.momentum
                unbiased = batch_var * (n / (n - 1).clamp_min(1))
                bn.running_mean.copy_(torch.where(has_stats, torch.lerp(mean, batch_mean, momentum), mean))
                bn.running_var.copy_(torch.where(has_stats, torch.lerp(var, unbiased, momentum), var))
        mean, var = torch.where(has_stats, batch_mean, mean), torch.where(has_stats, batch_var, var)
    out = (xs - mean.view(view)) * torch.rsqrt(var + bn.eps).view(view)
    if bn.affine:
        out = out * bn.weight.to(acc).view(view) + bn.bias.to(acc).view(view)
    return out.to(x.dtype)


def _run(module: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """module(x), with the BatchNorm layers of nn.Sequential containers under the routing rules."""
    if isinstance(module, _BatchNorm):
        return _norm(module, x, update_stats)
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = _run(layer, x, update_stats)
        return x
    return module(x)


def _check_norm_layers(block: nn.Module, name: str) -> None:
    for path, module in block.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        if not module.track_running_stats:
            raise ValueError(f"{name}: BatchNorm layer {path!r} must track running statistics")
        parts = path.split(".")
        for depth in range(1, len(parts)):
            if not isinstance(block.get_submodule(".".join(parts[:depth])), nn.Sequential):
                raise ValueError(f"{name}: BatchNorm layer {path!r} must sit in the block or in nn.Sequential "
                                 f"containers, not inside {type(block.get_submodule('.'.join(parts[:depth]))).__name__}")


class _DecisionGradient(torch.autograd.Function):
    """Passes a routed block's output through; its backward gives each image's decision the gradient
    <g, F^(x) - F(x)> = +-<g, y - other>, with `other` the output of the copy the image did not take."""

    @staticmethod
    def forward(ctx, out, decision, x_perm, order, dest, block, n_frozen):
        ctx.block, ctx.n_frozen = block, n_frozen
        # The backward pass runs outside any autocast region: the other copy must be recomputed
        # under the forward's autocast state to see the dtypes the forward saw.
        device_type = x_perm.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(out, x_perm, order, dest)
        return out.view_as(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, x_perm, order, dest = ctx.saved_tensors  # (once_differentiable: this runs under no_grad)
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            other = ctx.block._routes(x_perm, ctx.n_frozen, dest, swap=True, update_stats=False, keep_empty=False)
        other = other.to(torch.promote_types(grad.dtype, torch.float32))  # accumulate in fp32 or fp64
        diff = torch.sub(out.to(other.dtype), other, out=other)  # y - other, over other's buffer
        dots = diff.mul_(grad).sum(dim=tuple(range(1, grad.dim())))
        row_dots = dots.index_select(0, dest)  # row i of the routed order, image order[i]
        row_dots[:ctx.n_frozen].neg_()  # frozen-routed images: y - other = F(x) - F^(x)
        grad_decision = torch.zeros_like(row_dots).index_copy_(0, order, row_dots)
        grad_out = grad if ctx.needs_input_grad[0] else None
        return grad_out, grad_decision, None, None, None, None, None


class RoutedBlock(nn.Module):
    """Frozen and fine-tuned copies of a residual block, routed per image (see the module docstring).

    Subclasses define ``main(copy, x, update_stats)`` (the copy's main branch, its BatchNorm layers
    called through _norm/_run), ``shortcut(copy)`` (the shortcut module, IDENTITY, or None when there
    is no residual) and ``final_relu``.

    Args:
        block: the block to route; it becomes the frozen copy.
        execution: "grouped" (default) or "dense".
        backend: backend of the row ops (route_plan, gather_rows, combine_rows), see spottune_ext.backends.
        frozen_bn: "eval" (default, the frozen copy's BatchNorm stays in eval mode) or "train" (the
            authors: it trains its affine parameters and running statistics).

    forward(x, decision): x [B, C, H, W]; decision [B] floating, exactly 0.0 (frozen) or 1.0 (tuned)
    per image, possibly carrying a straight-through gradient. Returns the block's output [B, C', H', W'].
    """

    final_relu: bool = False

    def __init__(self, block: nn.Module, execution: str = "grouped", backend: str = "auto",
                 frozen_bn: str = "eval") -> None:
        super().__init__()
        name = type(self).__name__
        backends.check_name(backend, name)
        if frozen_bn not in FROZEN_BN:
            raise ValueError(f"{name}: frozen_bn must be one of {FROZEN_BN}, got {frozen_bn!r}")
        _check_norm_layers(block, name)
        self.execution = execution
        self.backend = backend
        self._frozen_bn = frozen_bn
        self.frozen = block
        self.tuned = deepcopy(block)
        if not _storages(block).isdisjoint(_storages(self.tuned)):
            raise RuntimeError(f"{name}: the tuned copy shares storage with the frozen copy")
        self.frozen.requires_grad_(False)
        self.tuned.requires_grad_(True)
        if frozen_bn == "train":
            for module in self.frozen.modules():
                if isinstance(module, _BatchNorm):
                    module.requires_grad_(True)
        self._identity_shortcut = self.shortcut(block) is IDENTITY
        self.train(block.training)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"{type(self).__name__}: execution must be one of {EXECUTIONS}, got {value!r}")
        self._execution = value

    @property
    def frozen_bn(self) -> str:
        return self._frozen_bn

    def train(self, mode: bool = True) -> "RoutedBlock":
        super().train(mode)
        if self._frozen_bn == "eval":
            self.frozen.eval()
        return self

    def main(self, copy: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, copy: nn.Module):
        raise NotImplementedError

    def _branch(self, copy: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        """The copy's main branch plus its shortcut module (the identity shortcut is left to the caller)."""
        out = self.main(copy, x, update_stats)
        shortcut = self.shortcut(copy)
        if isinstance(shortcut, nn.Module):
            out += _run(shortcut, x, update_stats)
        return out

    def _block(self, copy: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        """The whole copy on x, computed as the torchvision block computes it."""
        out = self._branch(copy, x, update_stats)
        if self._identity_shortcut:
            out += x
        return out.relu_() if self.final_relu else out

    def _routes(self, x_perm: torch.Tensor, n_frozen: int, dest: torch.Tensor, swap: bool, update_stats: bool,
                keep_empty: bool) -> torch.Tensor:
        """Rows [0, n_frozen) through the frozen copy and the rest through the tuned one (the other way
        round with swap), written to rows dest of the result by one combine_rows."""
        copies = (self.tuned, self.frozen) if swap else (self.frozen, self.tuned)
        # split, not narrow: its backward concatenates the two gradients instead of zero-filling
        # and adding two batch-sized tensors.
        parts = x_perm.split([n_frozen, x_perm.shape[0] - n_frozen])
        # Traced by torch.compile, the sub-batch sizes are data-dependent: both copies always run
        # (on an empty sub-batch that is a few empty kernels), so that one graph serves every split.
        keep_empty = keep_empty or x_perm.shape[0] == 0 or torch.compiler.is_compiling()
        out0, out1 = (self._branch(c, part, update_stats) if keep_empty or part.shape[0] else None
                      for c, part in zip(copies, parts))
        out0 = out1[:0] if out0 is None else out0
        out1 = out0[:0] if out1 is None else out1
        # Under autocast the copies' outputs can be of a lower precision than their input: the
        # identity shortcut is added in the outputs' dtype, as torchvision's in-place add does.
        residual = x_perm.to(out0.dtype) if self._identity_shortcut else None
        return combine_rows(out0, out1, dest, residual, self.final_relu, backend=self.backend)

    def _dense(self, x: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        tuned, frozen = self._block(self.tuned, x, True), self._block(self.frozen, x, True)
        # Mixed at the decision's precision at least (the decision's gradient is a difference of two
        # sums), returned in the copies' dtype, which autocast may have lowered.
        mask = decision.to(torch.promote_types(tuned.dtype, decision.dtype)).view(-1, *([1] * (x.dim() - 1)))
        return (mask * tuned + (1 - mask) * frozen).to(tuned.dtype)

    def forward_planned(self, x_perm: torch.Tensor, n_frozen: int, order: torch.Tensor, dest: torch.Tensor,
                        decision: torch.Tensor, dest_is_identity: bool = False) -> torch.Tensor:
        """The block on rows already in its route order (the step run_blocks chains).

        Args:
            x_perm: [B, C, H, W] input rows, row i being image order[i]: rows [0, n_frozen) take the
                frozen copy, the others the tuned copy.
            n_frozen: how many images take the frozen copy (a host integer).
            order: [B] int64, the image (batch index) of each row.
            dest: [B] int64, a permutation: row i of the result is written to row dest[i] of the output.
            decision: [B] decisions in batch order (only used for its gradient, and by dense execution).
            dest_is_identity: the caller knows that dest is range(B) (a host fact; False when unknown).
                Without autograd, a block whose images all take one copy then runs that copy as the
                torchvision block does, without a combine.
        """
        if self.execution == "dense":
            out = self._dense(x_perm, decision.index_select(0, order))
            return combine_rows(out, out[:0], dest, None, False, backend=self.backend)
        grad_enabled = torch.is_grad_enabled()
        if dest_is_identity and not grad_enabled and n_frozen in (0, x_perm.shape[0]):
            return self._block(self.frozen if n_frozen else self.tuned, x_perm, True)
        out = self._routes(x_perm, n_frozen, dest, swap=False, update_stats=True, keep_empty=grad_enabled)
        if grad_enabled and decision.requires_grad:
            out = _DecisionGradient.apply(out, decision, x_perm, order, dest, self, n_frozen)
        return out

    def forward(self, x: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x)
        _check_decisions(type(self).__name__, "decision", decision, (x.shape[0],), "[B]", x.device)
        if self.execution == "dense":
            return self._dense(x, decision)
        plan = route_plan(decision.detach().unsqueeze(1), chain=False, backend=self.backend)
        n_frozen = x.shape[0] - plan.counts[0]
        order, dest = plan.order[0], plan.dest[0]
        # One route for every image: the plan is the identity and the rows need no permuting.
        uniform = _uniform(n_frozen, x.shape[0])
        x_perm = x if uniform else gather_rows(x, order, backend=self.backend)
        return self.forward_planned(x_perm, n_frozen, order, dest, decision, dest_is_identity=uniform)


class RoutedBasicBlock(RoutedBlock):
    """Routed torchvision BasicBlock: conv3x3-BN-ReLU, conv3x3-BN, shortcut (identity or downsample), ReLU."""

    final_relu = True

    def __init__(self, block: BasicBlock, **kwargs) -> None:
        _check_block_type("RoutedBasicBlock", block, BasicBlock)
        super().__init__(block, **kwargs)

    def main(self, copy: BasicBlock, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = copy.relu(_norm(copy.bn1, copy.conv1(x), update_stats))
        return _norm(copy.bn2, copy.conv2(out), update_stats)

    def shortcut(self, copy: BasicBlock):
        return IDENTITY if copy.downsample is None else copy.downsample


class RoutedBottleneck(RoutedBlock):
    """Routed torchvision Bottleneck: conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN, shortcut, ReLU."""

    final_relu = True

    def __init__(self, block: Bottleneck, **kwargs) -> None:
        _check_block_type("RoutedBottleneck", block, Bottleneck)
        super().__init__(block, **kwargs)

    def main(self, copy: Bottleneck, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = copy.relu(_norm(copy.bn1, copy.conv1(x), update_stats))
        out = copy.relu(_norm(copy.bn2, copy.conv2(out), update_stats))
        return _norm(copy.bn3, copy.conv3(out), update_stats)

    def shortcut(self, copy: Bottleneck):
        return IDENTITY if copy.downsample is None else copy.downsample


class RoutedInvertedResidual(RoutedBlock):
    """Routed torchvision (MobileNetV2) InvertedResidual: expand, depthwise, project; identity
    shortcut only when the block has one (use_res_connect); no final activation."""

    def __init__(self, block: InvertedResidual, **kwargs) -> None:
        _check_block_type("RoutedInvertedResidual", block, InvertedResidual)
        super().__init__(block, **kwargs)

    def main(self, copy: InvertedResidual, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        return _run(copy.conv, x, update_stats)

    def shortcut(self, copy: InvertedResidual):
        return IDENTITY if copy.use_res_connect else None


def run_blocks(modules: Iterable[nn.Module], x: torch.Tensor, decisions: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """Runs `modules` in sequence; the l-th routed block among them takes decisions[:, l].

    One route_plan (chain=True) plans every routed block and brings all sub-batch sizes to the host
    in one copy; the rows are permuted once, before the first routed block, and each routed block
    writes its output in the order of the next one, the last in batch order. Modules before the
    first routed block see batch order, those between routed blocks a permuted order. A block whose
    images all take one copy has batch order: the first one is not gathered, and without autograd
    one whose next routed block also has batch order runs its copy as the torchvision block does.

    Args:
        modules: the modules to run (e.g. a ResNet's blocks); RoutedBlock instances are routed, the
            others are called as module(x).
        x: the input, [B, ...].
        decisions: [B, L] floating, exactly 0.0 or 1.0, L = the number of routed blocks.
        backend: backend of route_plan and of the initial gather_rows.
    """
    modules = list(modules)
    n_routed = sum(isinstance(m, RoutedBlock) for m in modules)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"run_blocks expects x as a tensor of shape [B, ...], got {_describe(x)}")
    _check_decisions("run_blocks", "decisions", decisions, (x.shape[0], n_routed), f"[B, L] = [B, {n_routed}] "
                     f"(one column per routed block)", x.device)
    if n_routed:
        plan = route_plan(decisions.detach(), chain=True, backend=backend)
        # A block whose images all take one copy has the identity order; its dest is the identity when
        # the next routed block's order is too (or when it is the last).
        uniform = [_uniform(x.shape[0] - count, x.shape[0]) for count in plan.counts] + [True]
    routed = 0
    for module in modules:
        if not isinstance(module, RoutedBlock):
            x = module(x)
            continue
        if routed == 0 and not uniform[0]:
            x = gather_rows(x, plan.order[0], backend=backend)
        x = module.forward_planned(x, x.shape[0] - plan.counts[routed], plan.order[routed], plan.dest[routed],
                                   decisions[:, routed], dest_is_identity=uniform[routed] and uniform[routed + 1])
        routed += 1
    return x


def _uniform(n_frozen, batch: int) -> bool:
    """Whether every image takes one copy: a host fact, never known when traced (the sizes are symbols)."""
    return not torch.compiler.is_compiling() and n_frozen in (0, batch)


def _storages(module: nn.Module) -> set:
    # Meta tensors (a model built to check its shapes) have no storage to share.
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())
            if t.numel() and t.device.type != "meta"}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__


def _check_block_type(name: str, block, expected: type) -> None:
    if not isinstance(block, expected):
        raise TypeError(f"{name} expects a torchvision {expected.__module__}.{expected.__name__}, "
                        f"got {type(block).__name__}")


def _check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} expects x of shape [B, C, H, W], got {_describe(x)}")


def _check_decisions(name: str, arg: str, decision, shape: tuple, expected: str, device: torch.device) -> None:
    if not isinstance(decision, torch.Tensor):
        raise TypeError(f"{name} expects {arg} as a tensor of shape {expected}, got {type(decision).__name__}")
    if tuple(decision.shape) != shape:
        raise ValueError(f"{name} expects {arg} of shape {expected} with B = {shape[0]} (x's batch size), "
                         f"got {list(decision.shape)}")
    if not decision.is_floating_point():
        raise TypeError(f"{name} expects {arg} of a floating dtype holding 0.0 or 1.0, got {decision.dtype}")
    if decision.device != device:
        raise ValueError(f"{name} expects {arg} on x's device ({device}), got {decision.device}")
