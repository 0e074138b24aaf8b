"""Speed and peak memory of one DDPO update (forward + PPO loss + backward + AdamW step).

Why: DESIGN §5 compares with ddpo-pytorch (36–46 samples·timesteps/s on a 1 M-param UNet,
batch 8, 2 CPU cores; peak RSS 0.95 GB full / 2.1 GB LoRA). This measures the same unit of
work with our Policy on random weights:

    python bench/train_step.py                # two tiny configs, LoRA and full
    python bench/train_step.py --sd15 --device cuda --bf16 --gradient-checkpointing

Peak memory: RSS high-water mark on CPU (ru_maxrss, whole process), and
``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.ddpo import ppo_clip_loss  # noqa: E402
from rl.policy import Policy, build_tiny_models  # noqa: E402
from rl.sampling import gaussian_log_prob, step_mean  # noqa: E402


def sd15_models():
    from rl.weights import SD15_CONTROLNET_CONFIG, SD15_UNET_CONFIG, ensure_model_imports, load_config

    ensure_model_imports()
    from diffusers import ControlNetModel, UNet2DConditionModel

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    return (UNet2DConditionModel(**strip(load_config(None, SD15_UNET_CONFIG))),
            ControlNetModel(**strip(load_config(None, SD15_CONTROLNET_CONFIG))))


def one_config(name, unet, cn, mode, batch, latent, ctx_len, ctx_dim, device, bf16, ckpt, steps):
    pol = Policy(unet, cn, mode=mode, gradient_checkpointing=ckpt,
                 autocast_dtype=torch.bfloat16 if bf16 else None).to(device)
    params = [p for p in pol.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    h = latent
    x = torch.randn(batch, 4, h, h, device=device)
    x_next = x + 0.1 * torch.randn_like(x)
    cond = torch.randn(batch, ctx_len, ctx_dim, device=device)
    uncond = torch.randn(batch, ctx_len, ctx_dim, device=device)
    hint = torch.rand(batch, 3, 8 * h, 8 * h, device=device)
    sigma = torch.full((batch,), 2.0, device=device)
    t = torch.full((batch,), 500.0, device=device)
    old = torch.zeros(batch, device=device)
    adv = torch.randn(batch, device=device)

    def update():
        d = pol(x, sigma, t, cond, uncond, hint, 1.0, 7.5)
        lp = gaussian_log_prob(x_next, step_mean(x, d, 0.5), 0.5)
        loss, _ = ppo_clip_loss(lp, old.detach() + lp.detach(), adv, 0.02)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    update()  # warm-up (allocator, oneDNN primitives, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**30
        mem_kind = "GPU alloc"
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_kind = "RSS"
    n_unet = sum(p.numel() for p in pol.unet.parameters()) / 1e6
    return {"config": name, "mode": mode, "unet_M": n_unet, "trainable_M": pol.num_trainable() / 1e6,
            "batch": batch, "latent": h, "s_per_update": dt, "samples_steps_per_s": batch / dt,
            "peak_GB": mem, "mem": mem_kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd15", action="store_true", help="also an SD1.5-size UNet + ControlNet (random weights)")
    ap.add_argument("--only-sd15", action="store_true", help="skip the tiny configs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sd15-batch", type=int, default=4)
    ap.add_argument("--sd15-latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed updates per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="lora,full")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for mode in args.modes.split(","):
        if not args.only_sd15:
            for name, width, latent in (("tiny-32", (32, 64), 8), ("tiny-64", (32, 64, 64), 8)):
                unet, cn = build_tiny_models(width=width)
                rows.append(one_config(name, unet, cn, mode, args.batch, latent, 8, 32, device, args.bf16,
                                       args.gradient_checkpointing, args.steps))
                print(rows[-1], flush=True)
        if args.sd15 or args.only_sd15:
            unet, cn = sd15_models()
            rows.append(one_config("sd15", unet, cn, mode, args.sd15_batch, args.sd15_latent, 77, 768, device,
                                   args.bf16, args.gradient_checkpointing, args.steps))
            print(rows[-1], flush=True)
            del unet, cn
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\ndevice={device} bf16={args.bf16} grad_ckpt={args.gradient_checkpointing} threads={args.threads}")
    print(f"{'config':<9}{'mode':<6}{'UNet M':>8}{'train M':>9}{'batch':>6}{'latent':>7}"
          f"{'s/update':>10}{'samp·steps/s':>14}{'peak GB':>9}  mem")
    for r in rows:
        print(f"{r['config']:<9}{r['mode']:<6}{r['unet_M']:>8.2f}{r['trainable_M']:>9.2f}{r['batch']:>6}"
              f"{r['latent']:>7}{r['s_per_update']:>10.3f}{r['samples_steps_per_s']:>14.1f}{r['peak_GB']:>9.2f}  {r['mem']}")


if __name__ == "__main__":
    main()
