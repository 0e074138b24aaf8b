"""What scan guidance costs per guided step, next to the model call it rides on.

Scan guidance (``rl.scan_guidance.guide``) runs no UNet pass: per iteration one decode of the
prediction through the latent→RGB map, its backward, and one more decode for the step length.
This prints, per setting, the median time of ``guide`` and of one sampler step of the toy
model (``Policy.denoise``: ControlNet + UNet, CFG), and the size of the tensors guidance keeps
alive (its extra memory: a few copies of the prediction and of the decoded picture).

    python bench/guidance_cost.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]]  # ComfyUI's SD1.5 latent_rgb_factors


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from rl.module_feedback import latent_rgb, light_grids
    from rl.scan_guidance import ScanGuidance, guide
    from rl.toy import world
    from rl.toy.model import ToyModel, eval_prompts_codes, latents_to_images, sampling_schedule

    torch.set_num_threads(args.threads)
    model = ToyModel.load()
    b = 16
    prompts, codes, _ = eval_prompts_codes(b)
    light = light_grids(codes)
    cond, uncond = model.encode_prompts(prompts)
    hints = torch.stack([world.hint_image(c) for c in codes])
    policy = model.policy(None)
    sigmas, timesteps = sampling_schedule(model.steps)
    x = torch.randn(b, world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE) * float(sigmas[-2])
    strength = torch.full((b,), 0.5)
    with torch.no_grad():
        step_ms = _median_ms(lambda: policy.denoise(x, float(sigmas[-2]), timesteps[-1], cond, uncond, hints, strength,
                                                    float(model.info["sampling"]["cfg"])), args.repeats)
        d = policy.denoise(x, float(sigmas[-2]), timesteps[-1], cond, uncond, hints, strength,
                           float(model.info["sampling"]["cfg"]))
    rows = [("toy model step (ControlNet + UNet, CFG), batch 16, latent 12×32×32", step_ms, "")]
    for it in (1, 2, 4):
        g = ScanGuidance(iterations=it)
        ms = _median_ms(lambda g=g: guide(d, latents_to_images, light, g), args.repeats)
        rows.append((f"toy: guide, {it} iteration(s), batch 16", ms, f"{ms / step_ms:.0%} of a step"))
    sd = torch.randn(4, 4, 64, 64)
    sd_light = light_grids([codes[0]] * 4)

    def preview(z: torch.Tensor) -> torch.Tensor:
        return latent_rgb(z, SD15_RGB, clamp=False)

    for it in (1, 2, 4):
        g = ScanGuidance(iterations=it)
        ms = _median_ms(lambda g=g: guide(sd, preview, sd_light, g), args.repeats)
        rows.append((f"SD1.5 latent 4×64×64 (512²), batch 4, preview decoder: guide, {it} iteration(s)", ms, ""))
    kept = 4 * (d.numel() + latents_to_images(d).numel()) * 4 / 2**20
    print("| what | median ms | relative |\n|---|---|---|")
    for name, ms, rel in rows:
        print(f"| {name} | {ms:.1f} | {rel} |")
    print(f"\nGuidance keeps about {kept:.1f} MiB alive on the toy at batch 16 (prediction, edit, decoded picture, "
          f"gradient); threads {args.threads}, {args.repeats} repeats.")


if __name__ == "__main__":
    main()
