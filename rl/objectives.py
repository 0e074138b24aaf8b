"""Training objectives on recorded trajectories, as tensor math (the trainer is ``rl/train.py``).

Two objectives ship, chosen with ``qr-rl train --objective``:

``ddpo``  PPO-clip on the recorded steps (Black et al. 2023): each step's log-probability ratio
          times the sample's group-normalised advantage (:func:`rl.ddpo.ppo_clip_loss`). Unbiased,
          but its gradient is the product of a scalar reward and one Gaussian draw per step: at
          the few hundred samples a round holds, two halves of a batch give updates that barely
          agree (``bench/gradient_check.py``).

``rwr``   reward-weighted regression onto the recorded predictions (Peters & Schaal 2007; the
          exponentiated advantage of AWR, Peng et al. 2019). For every recorded step the
          ControlNet, run *plainly* (one strength, no gain map, no luma projection), is regressed
          onto the denoised prediction ``D`` that the sampler actually used there, each sample
          weighted by ``exp(A / β)``. When the shards come from a sampler with tricks (module
          feedback's gain maps, luma-only control, a learned strength curve), this *distils* what
          the tricks did into the ControlNet's weights, weighted toward the samples that scanned
          with their art kept: the tuned file reproduces, in any stock sampler, what the tricks
          produced. Its gradient is a regression gradient (a dense per-pixel target, no sampled
          noise in its direction), which is why it passes the gradient check at the demo's batch
          size. On shards of a plain sampler with the same ControlNet the targets are the
          ControlNet's own predictions and there is nothing to learn; the trainer says so.

Why not the others the literature offers (measured on the toy, ``docs/research-log.md``): a
ControlNet++-style reward gradient through a one-step prediction, with a differentiable module
margin and a pixel term toward the no-ControlNet prediction, traded art for decoding far below
the strength dial. Diffusion-DPO on the demo's same-seed pairs (``bench/dpo_check.py``): on the
recorded steps' log-probabilities it is noise, like ddpo; on the final images its update is one
direction, "more ControlNet", whatever the labels say, and it lost decode at equal art. Not built.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("ddpo", "rwr")


def advantage_weights(advantages: torch.Tensor, mask: torch.Tensor, beta: float, clip: float = 20.0) -> torch.Tensor:
    """``[B]``: ``exp(A / β)`` over the used samples, normalised to mean 1 there; 0 where masked.

    Normalising keeps the loss (and so the learning rate) on the scale of an unweighted
    regression whatever ``β``; the exponent is clipped at ``clip`` so one outlier cannot take
    every weight."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a = advantages.double()
    m = mask.bool()
    w = torch.zeros_like(a)
    if bool(m.any()):
        z = (a[m] / beta).clamp(-clip, clip)
        z = z - z.max()
        e = torch.exp(z)
        w[m] = e / e.mean()
    return w.float()


def regression_loss(denoised: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_n(w_n · mean_dims((D_n − target_n)²))`` and the per-unit unweighted error ``[N]``.

    A mean over dimensions, like the log-probability's, so a latent's size does not change the
    learning rate."""
    err = (denoised.float() - target.float()).pow(2).flatten(1).mean(1)
    return (err * weights.to(err)).mean(), err.detach()
