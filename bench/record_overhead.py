"""Wall-time cost of recording a trajectory (target: <= 3%).

Why: the RL sampler node records every step's latent, denoised estimate and log-prob; that
must not slow sampling down noticeably. This runs ``rl.sampling.sample_loop`` -- the loop the
ComfyUI node runs inside ``KSAMPLER`` -- with a real (tiny, random) diffusers SD1.5-layout
UNet behind classifier-free guidance, with and without ``record``, same model, same seeds,
interleaved (A B A B ...) so drift on a shared machine hits both equally. Prints medians and
the ratio. The node's other recording work (hashing: cached; embeddings and hint: one copy per
batch) is outside the loop and is a one-off per prompt.

    python bench/record_overhead.py [--latent 32] [--batch 2] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--batch", type=int, default=2, help="images per batch")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per mode (after one warm-up each)")
    ap.add_argument("--cfg", type=float, default=7.0, help="guidance scale")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()

    import torch

    from rl.sampling import batch_seeds, sample_loop
    from rl.testing.tiny_sd import build_tiny_unet

    if args.threads:
        torch.set_num_threads(args.threads)
    unet = build_tiny_unet(0)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - acp) / acp) ** 0.5).log().float()
    sig = torch.exp(torch.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), args.steps))
    sigmas = torch.cat([sig, torch.zeros(1)])
    b = args.batch
    ctx = torch.randn(2 * b, 77, 768, generator=torch.Generator().manual_seed(1))
    seeds = batch_seeds(123, b)

    @torch.no_grad()
    def denoise(x, sigma, _k):
        t = int(torch.argmin((log_sigmas - torch.log(torch.tensor(sigma))).abs()))
        xin = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
        eps = unet(xin, t, encoder_hidden_states=ctx).sample
        eps_u, eps_c = eps.chunk(2)
        return x - sigma * (eps_u + args.cfg * (eps_c - eps_u))

    x0 = float(sigmas[0]) * torch.randn(b, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))

    def run(record: bool) -> float:
        start = time.perf_counter()
        sample_loop(denoise, x0, sigmas, 1.0, 1.0, seeds, record=record)
        return time.perf_counter() - start

    run(False), run(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for mode in (False, True):
            times[mode].append(run(mode))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    per_step = off / args.steps
    print(f"latent {args.latent}x{args.latent}, batch {b}, {args.steps} steps, CFG {args.cfg}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"record off: median {off:.3f} s ({per_step * 1000:.1f} ms/step)  runs {[round(t, 3) for t in times[False]]}")
    print(f"record on : median {on:.3f} s  runs {[round(t, 3) for t in times[True]]}")
    print(f"overhead: {100 * (on / off - 1):+.2f}% (target <= 3%)")


if __name__ == "__main__":
    main()
