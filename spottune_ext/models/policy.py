"""The SpotTune policy network: a small ResNet that emits every block's route decision at once."""
import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, backends
from ..ops import gumbel_st
from .resnet26 import DecathlonResNet


def _positive_int(name: str, value, expected: str = "a positive int") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"PolicyNet: {name} must be {expected}, got {value!r}")
    return int(value)



class PolicyNet(nn.Module):
    """Policy network (paper sec. 3.2): image -> [B, L, 2] logits -> decisions I [B, L] in {0, 1}.

    A ResNet with one BasicBlock per width (stem conv3x3 3->stem_width, stride 2 per block, parameter-free
    shortcuts, pool, linear to 2L logits), random init. Its decisions come from the straight-through
    Gumbel-softmax (spottune_ext.gumbel_st): index 1 of the last dimension is the fine-tuned copy.

    Args:
        num_blocks: L, the number of routed blocks.
        widths: channels of the policy's blocks (paper: 64/128/256/512 for ResNet-50, 64/128/256 for ResNet-26).
        stem_width: channels of its stem (32 in the paper); widths must not be below it.
        input_size: if given, the image is resized (bilinear, antialiased) to input_size x input_size
            before the policy reads it, which makes the policy cheaper; None reads the image as it is
            (the authors' choice).
        input_scale: or the image is resized by this factor in (0, 1] (0.5: half resolution, as
            BlockDrop's policy reads it); not together with input_size.
        tau: Gumbel-softmax temperature (the authors use 5 and never anneal it); tau and tau_min must be
            at least 1 / (the largest float32) ~ 2.9e-39, so that 1 / tau is finite in float32.
        tau_decay, tau_min: optional exponential annealing: every anneal() call multiplies tau by
            tau_decay, never going below tau_min (tau_decay=1 keeps tau constant).
        sample_in_eval: in eval mode decisions are the argmax of the logits unless this is True, in
            which case they are sampled as in training (the authors' evaluation samples). The mode of
            each call is in `last_mode` ("sample" or "argmax").
        backend: gumbel_st backend.
        init_tuned: the probability with which a fresh policy sends an image to each block's fine-tuned
            copy: the output layer's biases start at the log-odds of init_tuned (its weights keep their
            random initialisation, so the images still differ). None: the paper's unbiased start (about
            1/2). The default, 0.9, starts close to standard fine-tuning: the two copies of a block start
            identical, so the decisions get no gradient until the fine-tuned copies move, and an unbiased
            random routing of every block meanwhile keeps the network from learning at all in the
            low-data runs of bench/ACCURACY.md (validation accuracy about 0.2 against 0.77 at 0.9).

    The temperature is part of the state dict (extra state), so a checkpoint resumes annealing where it was.

    Its cost counts: at 224x224 the paper's ResNet-50 policy (64/128/256/512) takes 2.8 GMACs, ResNet-50
    itself 4.1; with input_size=112 it takes 0.7. The ResNet-26 policy on 72x72 Decathlon images takes
    0.22 GMACs (ResNet-26: 1.08). convert() builds a policy sized to its backbone unless told otherwise
    (families.Family.policy_defaults): widths 32/64 at half resolution cost 0.027x a ResNet-50's
    compute and 0.062x a ResNet-18's, widths 16/32 (stem 16) at half resolution 0.10x a MobileNetV2's,
    at any image size. (torch.utils.flop_counter, batch of one.)
    """

    def __init__(self, num_blocks: int, widths: Sequence[int] = (64, 128, 256, 512), input_size: Optional[int] = None,
                 tau: float = 5.0, tau_decay: float = 1.0, tau_min: float = 0.5, sample_in_eval: bool = False,
                 backend: str = "auto", stem_width: int = 32, init_tuned: Optional[float] = 0.9,
                 input_scale: Optional[float] = None) -> None:
        super().__init__()
        num_blocks = _positive_int("num_blocks", num_blocks, "a positive int (the number of routed blocks)")
        tau, tau_min = _checks.tau("PolicyNet", tau, "tau"), _checks.tau("PolicyNet", tau_min, "tau_min")
        if isinstance(tau_decay, bool) or not isinstance(tau_decay, numbers.Real) or not 0 < tau_decay <= 1:
            raise ValueError(f"PolicyNet: tau_decay must be a number in (0, 1], got {tau_decay!r}")
        if init_tuned is not None and (isinstance(init_tuned, bool) or not isinstance(init_tuned, numbers.Real)
                                       or not 0 < init_tuned < 1):
            raise ValueError(f"PolicyNet: init_tuned must be a number in (0, 1) or None, got {init_tuned!r}")
        if input_size is not None:
            input_size = _positive_int("input_size", input_size, "a positive int or None")
        if input_scale is not None:
            if isinstance(input_scale, bool) or not isinstance(input_scale, numbers.Real) or not 0 < input_scale <= 1:
                raise ValueError(f"PolicyNet: input_scale must be a number in (0, 1] or None, got {input_scale!r}")
            if input_size is not None:
                raise ValueError("PolicyNet: give input_size or input_scale, not both")
            input_scale = float(input_scale)
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(f"PolicyNet: widths must be a non-empty sequence of positive ints, got {widths!r}")
        widths = tuple(_positive_int("every width", w) for w in widths)
        stem_width = _positive_int("stem_width", stem_width)
        if not isinstance(sample_in_eval, bool):
            raise TypeError(f"PolicyNet: sample_in_eval must be a bool, got {type(sample_in_eval).__name__}")
        backends.check_name(backend, "PolicyNet")
        self.num_blocks, self.widths, self.input_size, self.input_scale = num_blocks, widths, input_size, input_scale
        self.tau, self.tau_decay, self.tau_min = tau, float(tau_decay), tau_min
        self.sample_in_eval, self.backend = sample_in_eval, backend
        self.last_mode: Optional[str] = None
        self.stem_width = stem_width
        self.init_tuned = init_tuned
        self.net = DecathlonResNet(2 * num_blocks, (1,) * len(widths), widths, stem_width)
        if init_tuned is not None:
            with torch.no_grad():
                bias = self.net.fc.bias.view(num_blocks, 2)
                bias[:, 0] = 0.0
                bias[:, 1] = math.log(init_tuned / (1 - init_tuned))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, 2] scores of the frozen (0) and fine-tuned (1) copy of every block."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        elif self.input_scale is not None and self.input_scale != 1:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False, antialias=True)
        return self.net(x).view(x.shape[0], self.num_blocks, 2)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decisions I [B, L] (exactly 0/1, straight-through gradient); noise: optional uniform [B, L] samples."""
        sample = self.training or self.sample_in_eval
        self.last_mode = "sample" if sample else "argmax"
        return gumbel_st(self.logits(x), self.tau, sample=sample, noise=noise, backend=self.backend)

    def anneal(self) -> float:
        """One annealing step (e.g. per epoch): tau <- max(tau_min, tau * tau_decay). Returns the new tau.

        A tau already below tau_min stays where it is.
        """
        self.tau = max(min(self.tau_min, self.tau), self.tau * self.tau_decay)
        return self.tau

    def get_extra_state(self) -> dict:
        return {"tau": self.tau}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "tau" not in state:
            raise ValueError(f"PolicyNet: extra state must be {{'tau': float}}, got {state!r}")
        self.tau = _checks.tau("PolicyNet (saved state)", state["tau"])

    def config(self) -> dict:
        return {"num_blocks": self.num_blocks, "widths": list(self.widths), "input_size": self.input_size,
                "input_scale": self.input_scale,
                "tau": self.tau, "tau_decay": self.tau_decay, "tau_min": self.tau_min,
                "sample_in_eval": self.sample_in_eval, "backend": self.backend, "stem_width": self.stem_width,
                "init_tuned": self.init_tuned}

    def extra_repr(self) -> str:
        return (f"num_blocks={self.num_blocks}, widths={self.widths}, input_size={self.input_size}, "
                f"input_scale={self.input_scale}, tau={self.tau:g}, "
                f"tau_decay={self.tau_decay:g}, sample_in_eval={self.sample_in_eval}")
