"""Weight anchor: after every optimizer step, pull the trained ControlNet weights part of the
way back toward a reference ControlNet (usually the pretrained one).

Why: policy-gradient updates from a few hundred samples are mostly noise. In the ControlNet's
weights that noise adds up over rounds as a random walk, and on the toy it costs art
similarity without buying decode. A per-step decay ``θ ← θ - d·(θ - θ_ref)`` bounds the
random walk, while a direction the reward keeps pushing settles at a finite offset
(about ``lr/d`` per unit of normalised gradient). It is the weight-space cousin of the KL
penalty RLHF uses against the reference model, and it costs nothing per sample. It differs
from the trainer's ``kl_coef`` in two ways: that KL is to the *round's* starting policy (so it
resets every round), while the anchor holds across rounds of a loop when it is given the
pretrained file.

Measured on the toy (docs/research-log.md, open problems) it kept art but not the decode gain, so it
is off by default everywhere.

Only for ``mode`` ``full`` or ``zero_convs``: a LoRA adapter is a separate low-rank update
whose natural reference is zero, and its rank already limits the drift.
"""

from __future__ import annotations

import torch

from .errors import QRRLError


class WeightAnchor:
    """Reference copies of a module's trainable parameters and the pull toward them."""

    def __init__(self, params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.reference = reference

    @classmethod
    def build(cls, trained: torch.nn.Module, reference: torch.nn.Module) -> WeightAnchor:
        """Pair every trainable parameter of ``trained`` with the same-named tensor of ``reference``."""
        ref_state = reference.state_dict()
        params: dict[str, torch.nn.Parameter] = {}
        refs: dict[str, torch.Tensor] = {}
        for name, p in trained.named_parameters():
            if not p.requires_grad:
                continue
            if name not in ref_state:
                raise QRRLError(f"the anchor ControlNet has no parameter {name!r}: it must be the same "
                                "architecture as the ControlNet being trained")
            ref = ref_state[name]
            if tuple(ref.shape) != tuple(p.shape):
                raise QRRLError(f"anchor ControlNet parameter {name!r} has shape {tuple(ref.shape)}, "
                                f"the trained one {tuple(p.shape)}: not the same architecture")
            params[name] = p
            refs[name] = ref.detach().to(device=p.device, dtype=p.dtype).clone()
        if not params:
            raise QRRLError("the weight anchor found no trainable ControlNet parameters")
        return cls(params, refs)

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        """``θ ← θ - decay·(θ - θ_ref)`` for every anchored parameter (after ``optimizer.step()``)."""
        if decay <= 0:
            return
        for name, p in self.params.items():
            p.sub_(decay * (p - self.reference[name]))

    @torch.no_grad()
    def distance(self) -> float:
        """Root of the summed squared distance to the reference (a drift diagnostic for the logs)."""
        total = sum(float(((p - self.reference[n]) ** 2).sum()) for n, p in self.params.items())
        return total ** 0.5
