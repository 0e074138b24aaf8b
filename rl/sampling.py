"""The stochastic sampler step of DESIGN §3 and its Gaussian log-probability.

Why one implementation: the ComfyUI sampler node records log-probs with it, the in-process
collector (toy model) samples with it, and the DDPO trainer recomputes the same step's mean
and log-prob with it. If they differed, the first update would already be off-policy.

Sigma parametrisation (ComfyUI / k-diffusion): ``x = x0 + sigma * eps``. One step from
``sigma`` to ``sigma_next`` with denoised ``D = denoiser(x, sigma)``::

    sigma_up   = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    mean       = (sigma_down / sigma) x + (1 - sigma_down / sigma) D
    x_next     = mean + s_noise * sigma_up * z,   z ~ N(0, I)

``eta = 0`` is ComfyUI's Euler step; ``eta = 1, s_noise = 1`` is Euler ancestral. A step with
standard deviation 0 (``sigma_next == 0``, ``eta == 0`` or ``s_noise == 0``) is deterministic:
its log-prob is recorded as 0 and it is *not trainable*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Number = float | torch.Tensor

# --------------------------------------------------------------------------------------------
# the step


def step_coefficients(sigma: Number, sigma_next: Number, eta: float) -> tuple[Number, Number]:
    """``(sigma_up, sigma_down)`` for one step (floats in, floats out; tensors in, tensors out).

    ``sigma`` must be > 0 and ``sigma_next`` in ``[0, sigma]``; ``eta >= 0`` (values above 1
    are capped by ``min(sigma_next, ...)``, as in k-diffusion).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        s = torch.as_tensor(sigma)
        sn = torch.as_tensor(sigma_next, dtype=s.dtype, device=s.device)
        var = (sn**2 * (s**2 - sn**2) / s**2).clamp(min=0.0)
        up = torch.minimum(sn, eta * var.sqrt())
        down = (sn**2 - up**2).clamp(min=0.0).sqrt()
        return up, down
    s, sn = float(sigma), float(sigma_next)
    if not s > 0:
        raise ValueError(f"sigma must be > 0, got {s}")
    if not 0.0 <= sn <= s:
        raise ValueError(f"sigma_next must be in [0, sigma={s}], got {sn}")
    if eta == 0:
        return 0.0, sn
    up = min(sn, eta * math.sqrt(max(0.0, sn * sn * (s * s - sn * sn) / (s * s))))
    down = math.sqrt(max(0.0, sn * sn - up * up))
    return up, down


@dataclass
class StepOut:
    """Result of :func:`stochastic_step`.

    x_next [B,...]; mean [B,...] (carries grad if ``denoised`` does); std = s_noise·σ_up and
    mean_coef = σ_down/σ (floats for float sigmas); log_prob [B] (float32 or float64, 0 for a
    deterministic step).
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    std: Number
    mean_coef: Number
    log_prob: torch.Tensor

    @property
    def trainable(self) -> bool:
        """False for a deterministic step (std 0), whose log-prob is meaningless."""
        return bool(self.std > 0) if not isinstance(self.std, torch.Tensor) else bool((self.std > 0).all())


def step_mean(x: torch.Tensor, denoised: torch.Tensor, mean_coef: Number) -> torch.Tensor:
    """``mean_coef · x + (1 − mean_coef) · D`` — the one formula used everywhere (bitwise replay)."""
    return mean_coef * x + (1.0 - mean_coef) * denoised


def _logprob_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: Number) -> torch.Tensor:
    """``[B]``: mean over all non-batch dims of ``log N(x_next; mean, std²)`` (DDPO: mean, not sum).

    Computed in float32 (float64 if the inputs are), differentiable w.r.t. ``mean`` (and
    ``std``). ``std`` is a float or a tensor broadcastable to ``x_next`` and must be > 0; a
    deterministic step has no density — :func:`stochastic_step` records 0 for it instead.
    """
    if not isinstance(std, torch.Tensor):
        if not std > 0:
            raise ValueError(f"std must be > 0 for a Gaussian log-prob, got {std}")
    dtype = _logprob_dtype(x_next)
    x = x_next.to(dtype)
    mu = mean.to(dtype)
    sd = std.to(device=x.device, dtype=dtype) if isinstance(std, torch.Tensor) else torch.tensor(std, dtype=dtype)
    lp = -((x - mu) ** 2) / (2 * sd**2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim))) if lp.ndim > 1 else lp


def step_log_prob(
    x: torch.Tensor,
    denoised: torch.Tensor,
    x_next: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """``[B]`` log pi(x_next | x) of one recorded step, differentiable through ``denoised``.

    What the trainer calls with its own D(x_k) and the recorded x_k, x_{k+1}, sigmas. Raises
    ``ValueError`` for a deterministic step (std 0): such steps are not trainable.
    """
    sigma_up, sigma_down = step_coefficients(float(sigma), float(sigma_next), eta)
    std = s_noise * sigma_up
    if not std > 0:
        raise ValueError(f"step {sigma}->{sigma_next} (eta={eta}, s_noise={s_noise}) is deterministic")
    return gaussian_log_prob(x_next, step_mean(x, denoised, sigma_down / float(sigma)), std)


def stochastic_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: Number,
    sigma_next: Number,
    eta: float,
    s_noise: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOut:
    """One step of DESIGN §3.

    ``noise`` (z, standard normal, shape of ``x``) takes precedence; else z is drawn with
    ``generator`` (``torch.randn`` on x's device). For per-sample reproducible noise pass
    ``noise=step_noise(...)``. With std == 0 no noise is drawn, ``x_next = mean`` (``= D``
    when ``sigma_next == 0``) and ``log_prob = 0``. Never produces NaN for finite inputs.
    """
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")
    sigma_up, sigma_down = step_coefficients(sigma, sigma_next, eta)
    mean_coef = sigma_down / sigma
    std = s_noise * sigma_up
    if isinstance(mean_coef, torch.Tensor):
        mean_coef_b: Number = mean_coef.to(device=x.device, dtype=x.dtype)
        if mean_coef_b.ndim == 1 and mean_coef_b.numel() == x.shape[0] and x.ndim > 1:
            mean_coef_b = mean_coef_b.view(-1, *([1] * (x.ndim - 1)))
    else:
        mean_coef_b = mean_coef
    mean = step_mean(x, denoised, mean_coef_b)
    deterministic = (not bool((std > 0).all())) if isinstance(std, torch.Tensor) else not std > 0
    batch = x.shape[0]
    if deterministic:
        if isinstance(std, torch.Tensor) and bool((std > 0).any()):
            raise ValueError("std must be all zero or all positive within one step")
        lp = torch.zeros(batch, dtype=_logprob_dtype(x), device=x.device)
        return StepOut(x_next=mean, mean=mean, std=std, mean_coef=mean_coef, log_prob=lp)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x shape {tuple(x.shape)}")
    std_b = std
    if isinstance(std, torch.Tensor):
        std_b = std.to(device=x.device, dtype=x.dtype)
        if std_b.ndim == 1 and std_b.numel() == batch and x.ndim > 1:
            std_b = std_b.view(-1, *([1] * (x.ndim - 1)))
    x_next = mean + std_b * noise.to(device=x.device, dtype=x.dtype)
    return StepOut(x_next=x_next, mean=mean, std=std, mean_coef=mean_coef,
                   log_prob=gaussian_log_prob(x_next, mean, std_b))


# --------------------------------------------------------------------------------------------
# seeded noise

_MASK64 = (1 << 64) - 1
_STREAM_INIT = 0x1D5F_0000_0000_0001  # tag of the initial-latent stream (never a step index)


def _mix64(value: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit hash of an integer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, stream: int) -> int:
    """A 63-bit generator seed for ``(seed, stream)``; distinct streams give unrelated noise."""
    return _mix64(_mix64(int(seed) & _MASK64) ^ (int(stream) & _MASK64)) & ((1 << 63) - 1)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (CPU by default: same numbers on any machine)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & ((1 << 63) - 1))
    return gen


def _per_sample_noise(
    shape: Sequence[int], seeds: Sequence[int], stream: Callable[[int], int], dtype: torch.dtype, device
) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if len(seeds) != shape[0]:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for batch {shape[0]}")
    out = torch.empty(shape, dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = make_generator(derive_seed(int(seed), stream(int(seed))))
        out[i] = torch.randn(shape[1:], generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def step_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    step: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Standard-normal z for sampling step ``step`` (0-based), shape ``[B, ...]``.

    Sample ``i`` draws from its own CPU generator seeded by ``derive_seed(seeds[i], step)``,
    so each sample's noise depends only on its seed and the step, never on the batch it was
    sampled in (samples sharing a seed get the same noise). Drawn in float32 on CPU, then
    moved, so numbers agree across devices.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return _per_sample_noise(shape, seeds, lambda _s: step, dtype, device)


def initial_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Unit-variance initial latent noise ``[B, ...]``, one independent stream per seed.

    The caller scales it by sigma_max (or sqrt(1 + sigma_max²) like ComfyUI at full denoise).
    Note: ComfyUI's KSampler instead does ``generator = torch.manual_seed(seed)`` and one
    ``torch.randn(latent.size(), generator=generator)`` for the whole batch (comfy.sample.
    prepare_noise), so there sample i's noise depends on the batch size and position. The
    ComfyUI node keeps ComfyUI's initial noise; this per-sample stream is for the in-process
    sampler and the toy model.
    """
    return _per_sample_noise(shape, seeds, lambda _s: _STREAM_INIT, dtype, device)


def batch_seeds(seed: int, batch_size: int) -> list[int]:
    """The per-sample seeds ``seed, seed+1, ...`` the nodes use for a batch from one seed widget."""
    return [int(seed) + i for i in range(batch_size)]


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrajectoryRecord:
    """What :func:`sample_loop` records (CPU, float32, detached copies).

    x [B,K+1,...] (x_0 = x_init ... x_K = final); denoised [B,K,...]; log_prob [B,K];
    sigma [K+1]; std [K]; mean_coef [K]; strength [K] or None; seeds (one per sample);
    strength_map [B,K,1,h,w] or None: the module-feedback gain map each step used (set by the
    caller that applied it, :mod:`rl.module_feedback`; ones where a step had none).
    """

    x: torch.Tensor
    denoised: torch.Tensor
    log_prob: torch.Tensor
    sigma: torch.Tensor
    std: torch.Tensor
    mean_coef: torch.Tensor
    strength: torch.Tensor | None
    seeds: list[int]
    eta: float
    s_noise: float
    strength_map: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.sigma.shape[0]) - 1

    @property
    def trainable_steps(self) -> torch.Tensor:
        """Bool [K]: steps with std > 0 (the only ones the trainer may use)."""
        return self.std > 0


DenoiseFn = Callable[[torch.Tensor, float, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, StepOut], None]


def _as_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float32).reshape(-1)
    if sig.numel() < 2:
        raise ValueError("sigmas needs at least two values (one step)")
    if not torch.isfinite(sig).all() or (sig < 0).any():
        raise ValueError("sigmas must be finite and >= 0")
    if not (sig[1:] < sig[:-1]).all():
        raise ValueError("sigmas must be strictly decreasing")
    return sig


@torch.no_grad()
def sample_loop(
    denoise_fn: DenoiseFn,
    x_init: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    eta: float,
    s_noise: float,
    seeds: Sequence[int],
    record: bool = True,
    callback: StepCallback | None = None,
    strengths: Sequence[float] | None = None,
) -> tuple[torch.Tensor, TrajectoryRecord | None]:
    """Run K = len(sigmas) − 1 stochastic steps; return ``(x_final, record or None)``.

    ``denoise_fn(x, sigma, k) -> D`` gets the current latent, the step's sigma as a Python
    float and the step index. ``x_init`` must already be scaled to the first sigma by the
    caller (e.g. ``sigmas[0] * initial_noise(...)``). Step k's noise is
    ``step_noise(x.shape, seeds, k)``, so every sample is reproducible from its own seed.
    Sigmas are rounded to float32 first (what the record stores) so that
    :func:`replay_means` recomputes exactly the coefficients used here.
    ``callback(k, x_k, D_k, step_out)`` runs after each step (previews, progress).
    ``strengths`` (one per step) are only recorded. Recorded tensors are detached CPU float32
    copies. Runs under ``torch.no_grad()``: sampling never needs a graph (the trainer
    recomputes D with grad), so no step's graph can stay alive.
    """
    sig = _as_sigmas(sigmas)
    steps = sig.numel() - 1
    seeds = [int(s) for s in seeds]
    if len(seeds) != x_init.shape[0]:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for batch {x_init.shape[0]}")
    if strengths is not None and len(strengths) != steps:
        raise ValueError(f"strengths has {len(strengths)} values but there are {steps} steps")
    x = x_init
    xs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []
    lps: list[torch.Tensor] = []
    stds: list[float] = []
    coefs: list[float] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32, copy=True)

    if record:
        xs.append(keep(x))
    for k in range(steps):
        s, sn = float(sig[k]), float(sig[k + 1])
        denoised = denoise_fn(x, s, k)
        noise = None
        if s_noise * step_coefficients(s, sn, eta)[0] > 0:
            noise = step_noise(x.shape, seeds, k, dtype=x.dtype, device=x.device)
        out = stochastic_step(x, denoised, s, sn, eta, s_noise, noise=noise)
        if callback is not None:
            callback(k, x, denoised, out)
        if record:
            ds.append(keep(denoised))
            lps.append(keep(out.log_prob))
            stds.append(float(out.std))
            coefs.append(float(out.mean_coef))
            xs.append(keep(out.x_next))
        x = out.x_next
    if not record:
        return x, None
    rec = TrajectoryRecord(
        x=torch.stack(xs, dim=1),
        denoised=torch.stack(ds, dim=1),
        log_prob=torch.stack(lps, dim=1),
        sigma=sig.clone(),
        std=torch.tensor(stds, dtype=torch.float32),
        mean_coef=torch.tensor(coefs, dtype=torch.float32),
        strength=None if strengths is None else torch.tensor([float(v) for v in strengths], dtype=torch.float32),
        seeds=seeds,
        eta=float(eta),
        s_noise=float(s_noise),
    )
    return x, rec


# --------------------------------------------------------------------------------------------
# replay (tests, trainer drift checks)


def _step_floats(sigmas: torch.Tensor, eta: float, s_noise: float) -> list[tuple[float, float]]:
    sig = [float(v) for v in torch.as_tensor(sigmas).detach().to("cpu", torch.float32).reshape(-1)]
    out = []
    for s, sn in zip(sig[:-1], sig[1:]):
        up, down = step_coefficients(s, sn, eta)
        out.append((down / s, s_noise * up))
    return out


def replay_means(
    x: torch.Tensor, denoised: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, eta: float
) -> torch.Tensor:
    """Each step's mean ``[B,K,...]`` from recorded ``x`` [B,K+1,...] and ``denoised`` [B,K,...].

    Uses the same float32-rounded sigmas and the same formula as :func:`sample_loop`, so it
    reproduces the sampled means to float32 rounding; ``x[:, k+1] - mean[:, k]`` is then
    ``std_k · z_k``.
    """
    coefs = _step_floats(sigmas, eta, 1.0)
    if x.shape[1] != len(coefs) + 1 or denoised.shape[1] != len(coefs):
        raise ValueError(
            f"x has {x.shape[1]} states and denoised {denoised.shape[1]} steps but sigmas give {len(coefs)} steps"
        )
    return torch.stack([step_mean(x[:, k], denoised[:, k], c) for k, (c, _) in enumerate(coefs)], dim=1)


def replay_log_probs(
    x: torch.Tensor, denoised: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, eta: float, s_noise: float
) -> torch.Tensor:
    """Recompute ``log_prob`` [B,K] from a record (0 for deterministic steps), e.g. to measure drift."""
    means = replay_means(x, denoised, sigmas, eta)
    cols = []
    for k, (_, std) in enumerate(_step_floats(sigmas, eta, s_noise)):
        if std > 0:
            cols.append(gaussian_log_prob(x[:, k + 1], means[:, k], std))
        else:
            cols.append(torch.zeros(x.shape[0], dtype=_logprob_dtype(x), device=x.device))
    return torch.stack(cols, dim=1)
