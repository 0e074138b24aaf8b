"""ddpo-pytorch's side of ``bench/ddpo_side_by_side.py``; runs in the PEER's venv, not ours.

Why a separate file: ddpo-pytorch only runs on diffusers 0.17 (DESIGN §5), so it lives in its
own environment (diffusers 0.17.1, accelerate 0.17.0, transformers 4.30.2, huggingface_hub <
0.26, see the driver's docstring). This script imports nothing from this project. It loads the
shared tiny UNet folder the driver wrote and measures, on one thread:

* ``train_full`` / ``train_lora``: ddpo-pytorch's UNet update as its ``scripts/train.py``
  performs it -- the whole UNet trainable, or its LoRAAttnProcessor on every attention
  (rank 4, the peer's default) -- per timestep one batched CFG forward, the peer's own
  ``ddim_step_with_logprob`` for the log-prob, the PPO-clip loss, ``accelerator.backward``,
  one AdamW step per ``steps`` micro-batches (``accelerator.accumulate``), grad-norm clip 1.0.
  The training loop itself is a function-scoped block of the peer's ``main()``, so it is
  restated here with the same calls in the same order; the math is the peer's.
* ``sample``: the peer's ``pipeline_with_logprob`` (DDIM, eta 1, CFG, log-prob recorded),
  with ``output_type="latent"`` (no VAE decode; the driver's side does not decode either).

Prints one JSON line: ``units`` (samples·timesteps), ``seconds``, ``units_per_s``,
``peak_rss_gb`` (this process's RSS high-water mark), ``versions`` (the peer's libraries).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-src", required=True, help="ddpo-pytorch source folder (its ddpo_pytorch/ package)")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--what", choices=["train_full", "train_lora", "sample"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--groups", type=int, default=2, help="timed optimizer steps (or sampling batches)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.peer_src).resolve()))

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(a.threads)
    from ddpo_pytorch.diffusers_patch.ddim_with_logprob import ddim_step_with_logprob
    from ddpo_pytorch.diffusers_patch.pipeline_with_logprob import pipeline_with_logprob
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(a.model_dir)
    info = json.loads((root / "bench.json").read_text())
    unet = UNet2DConditionModel(**info["unet_config"])
    unet.load_state_dict(load_file(str(root / "unet.safetensors")))
    ctx_dim, ctx_len, latent = info["context_dim"], info["context_len"], info["latent"]
    # a text encoder and VAE only because StableDiffusionPipeline needs them; prompt embeds are
    # passed in and the latents are not decoded, so neither runs
    te = CLIPTextModel(CLIPTextConfig(hidden_size=ctx_dim, intermediate_size=2 * ctx_dim, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=ctx_len, vocab_size=100))
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae_scale_factor = 8  # SD's factor: latent × 8 pixels, as the driver's hint
    g = torch.Generator().manual_seed(0)
    b, steps = a.batch, a.steps
    cond = torch.randn(b, ctx_len, ctx_dim, generator=g)
    uncond = torch.randn(b, ctx_len, ctx_dim, generator=g)

    def sample_batch(seed: int):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            _, _, lat, lps = pipeline_with_logprob(
                pipe, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                guidance_scale=a.cfg, eta=1.0, output_type="latent", generator=gen,
                height=8 * latent, width=8 * latent)
        return torch.stack(lat, 1), torch.stack(lps, 1), pipe.scheduler.timesteps.repeat(b, 1)

    if a.what == "sample":
        sample_batch(0)  # warm-up
        t0 = time.perf_counter()
        for i in range(a.groups):
            sample_batch(i + 1)
        secs = time.perf_counter() - t0
        units = a.groups * b * steps
    else:
        from accelerate import Accelerator

        acc = Accelerator(gradient_accumulation_steps=steps)  # as the peer's train.py: no cpu flag (0.17 asserts on it)
        if a.what == "train_lora":
            from diffusers.loaders import AttnProcsLayers
            from diffusers.models.attention_processor import LoRAAttnProcessor

            unet.requires_grad_(False)
            procs = {}
            widths = unet.config.block_out_channels
            for name in unet.attn_processors:
                cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
                if name.startswith("mid_block"):
                    hidden = widths[-1]
                elif name.startswith("up_blocks"):
                    hidden = list(reversed(widths))[int(name[len("up_blocks.")])]
                else:
                    hidden = widths[int(name[len("down_blocks.")])]
                procs[name] = LoRAAttnProcessor(hidden_size=hidden, cross_attention_dim=cross)
            unet.set_attn_processor(procs)

            class Wrapper(AttnProcsLayers):
                def forward(self, *args, **kwargs):
                    return unet(*args, **kwargs)

            model = Wrapper(unet.attn_processors)
        else:
            unet.requires_grad_(True)
            model = unet
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        model, opt = acc.prepare(model, opt)
        lat, lps, ts = sample_batch(0)
        adv = torch.randn(b, generator=g)
        embeds = torch.cat([uncond, cond])

        def group() -> None:
            for j in range(steps):
                with acc.accumulate(model):
                    noise = model(torch.cat([lat[:, j]] * 2), torch.cat([ts[:, j]] * 2), embeds).sample
                    nu, nt = noise.chunk(2)
                    noise = nu + a.cfg * (nt - nu)
                    _, lp = ddim_step_with_logprob(pipe.scheduler, noise, ts[:, j], lat[:, j], eta=1.0,
                                                   prev_sample=lat[:, j + 1])
                    ratio = torch.exp(lp - lps[:, j])
                    loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)))
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad()

        model.train()
        group()  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.groups):
            group()
        secs = time.perf_counter() - t0
        units = a.groups * b * steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import accelerate
    import diffusers
    import huggingface_hub
    import transformers

    versions = {m.__name__: m.__version__ for m in (diffusers, accelerate, transformers, huggingface_hub, torch)}
    print(json.dumps({"side": "ddpo-pytorch", "what": a.what, "units": units, "seconds": secs,
                      "units_per_s": units / secs, "peak_rss_gb": rss, "versions": versions}))


if __name__ == "__main__":
    main()
