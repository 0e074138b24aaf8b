"""This project's DDPO update and sampler next to ddpo-pytorch's, on one shared tiny UNet, in one run.

Why: a speed claim against the reference implementation is only worth something like for like:
same UNet weights, latent size, batch, steps, CFG, precision and thread count, measured
interleaved in one run so that the shared machine's load hits both sides alike (issue 22).

The peer runs unmodified from its own source in its own venv (it only works on diffusers 0.17).
Set it up once, outside this repository::

    python3.11 -m venv /work/peer/venv
    /work/peer/venv/bin/pip install torch "diffusers==0.17.1" "accelerate==0.17.0" \\
        "transformers==4.30.2" "huggingface_hub<0.26" "numpy<2" "setuptools<70"
    # the source: a checkout of github.com/kvablack/ddpo-pytorch (commit 1958463 measured)
    git clone https://github.com/kvablack/ddpo-pytorch /work/peer/src

(``setuptools<70``: accelerate 0.17 imports ``pkg_resources``.) Then, from this repository::

    .venv/bin/python bench/ddpo_side_by_side.py --peer-python /work/peer/venv/bin/python \\
        --peer-src /work/peer/src [--rounds 2 --groups 2]

What is measured (one thread each, fp32, batch B = 8, T = 10 steps, CFG 5, 32×32 latents,
256² hint): every configuration in its own fresh process (so each peak RSS is its own), the
order rotated each round, the median over rounds reported.

* ours, ``train <mode>``: the trainer's own per-unit code (``rl.train._batch`` / ``_denoise`` /
  ``_log_prob``, ``rl.ddpo.ppo_clip_loss``, the hint embeddings cached by ``_embed_hints``),
  micro-batches of 8 (sample, step) units, one AdamW step per 80 units, grad-norm clip 1.0, on
  trajectories our sampler recorded. The ControlNet (strength 1) trains, the UNet is frozen.
  The time includes caching the hint embeddings; the trainer's no-grad π_old pass over the
  same units (which the peer does not have: it trusts the sampled log-probs) is timed apart.
* ddpo-pytorch, ``train full|lora``: ``bench/ddpo_peer_worker.py`` (its docstring says how).
* ``sample``: ours is ``rl.sampling.sample_loop`` over ``Policy.denoise`` with the ControlNet
  on and the log-prob recorded; the peer's is its ``pipeline_with_logprob`` (UNet only).

Units are samples·timesteps trained (or sampled) per second.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = (32, 64)
CONTEXT_DIM, CONTEXT_LEN, LATENT = 32, 8, 32
OURS = [("ours", "train", "full", "attention"), ("ours", "train", "lora", "attention"),
        ("ours", "train", "zero_convs", "attention"), ("ours", "sample", "zero_convs", "attention")]
OLD_LORA = ("ours", "train", "lora", "all")  # --old-lora: LoRA on every convolution, the pre-issue-22 targets
PEER = [("peer", "train_full", "", ""), ("peer", "train_lora", "", ""), ("peer", "sample", "", "")]


def write_models(folder: Path) -> None:
    """The shared tiny UNet (+ our ControlNet) as plain safetensors and configs both sides load."""
    from safetensors.torch import save_file

    from rl.policy import build_tiny_models, tiny_configs

    folder.mkdir(parents=True, exist_ok=True)
    ucfg, ccfg = tiny_configs(WIDTH, CONTEXT_DIM)
    ucfg = {**ucfg, "sample_size": LATENT}
    unet, cn = build_tiny_models(seed=0, width=WIDTH, context_dim=CONTEXT_DIM)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(folder / "controlnet.safetensors"))
    (folder / "bench.json").write_text(json.dumps({
        "unet_config": ucfg, "controlnet_config": ccfg, "context_dim": CONTEXT_DIM, "context_len": CONTEXT_LEN,
        "latent": LATENT, "unet_params": sum(p.numel() for p in unet.parameters()),
        "controlnet_params": sum(p.numel() for p in cn.parameters())}))


def ours(model_dir: Path, what: str, mode: str, scope: str, batch: int, steps: int, cfg: float,
         groups: int) -> dict:
    """Our side of one configuration, in this process (the driver runs it as a subprocess)."""
    from rl.convert import ensure_model_imports

    ensure_model_imports()
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from rl.ddpo import ppo_clip_loss
    from rl.policy import LoraSettings, Policy
    from rl.sampling import initial_noise, sample_loop
    from rl.toy import sampling_schedule
    from rl.train import _batch, _denoise, _embed_hints, _log_prob, _micro_batches, _Sample

    info = json.loads((model_dir / "bench.json").read_text())
    unet = UNet2DConditionModel(**info["unet_config"])
    unet.load_state_dict(load_file(str(model_dir / "unet.safetensors")))
    cn = ControlNetModel(**info["controlnet_config"])
    cn.load_state_dict(load_file(str(model_dir / "controlnet.safetensors")))
    torch.manual_seed(0)
    pol = Policy(unet, cn, mode=mode, lora=LoraSettings(rank=8, scope=scope))
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(batch, CONTEXT_LEN, CONTEXT_DIM, generator=g)
    uncond = torch.randn(batch, CONTEXT_LEN, CONTEXT_DIM, generator=g)
    hint = (torch.rand(batch, 3, 8 * LATENT, 8 * LATENT, generator=g) > 0.5).to(torch.uint8) * 255
    sigmas, timesteps = sampling_schedule(steps)

    def sample_batch(seed: int):
        seeds = list(range(seed * batch, (seed + 1) * batch))
        x0 = initial_noise((batch, 4, LATENT, LATENT), seeds) * float(sigmas[0])
        emb = pol.embed_hint(hint)

        def denoise(x, sigma, k):
            return pol.denoise(x, sigma, timesteps[k], cond, uncond, hint, 1.0, cfg, hint_embedding=emb)

        with torch.no_grad():
            return sample_loop(denoise, x0, sigmas, 1.0, 1.0, seeds, strengths=[1.0] * steps)[1]

    out: dict = {"side": "ours", "what": what, "mode": mode, "scope": scope, "trainable": pol.num_trainable()}
    if what == "sample":
        sample_batch(0)
        t0 = time.perf_counter()
        for i in range(groups):
            sample_batch(i + 1)
        secs = time.perf_counter() - t0
        units = groups * batch * steps
    else:
        rec = sample_batch(0)
        active = [k for k in range(steps) if rec.std[k] > 0]

        def samples() -> list:
            return [_Sample(x=rec.x[n], log_prob=rec.log_prob[n], denoised=rec.denoised[n], sigma=rec.sigma,
                            timestep=timesteps, std=rec.std, mean_coef=rec.mean_coef,
                            strength=torch.ones(steps), cond=cond[n], uncond=uncond[n], hint=hint[n], cfg=cfg,
                            apply_to_uncond=True, reward=0.0, active=active, bucket=()) for n in range(batch)]

        params = [p for p in pol.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
        adv = torch.randn(batch, generator=g)
        per_step = len(active) * batch // 8  # micro-batches per AdamW step: one step per B·T units

        def group(seed: int) -> int:
            ss = samples()
            _embed_hints(pol, ss, "cpu")  # per round, as the trainer does: counted in the time
            units = [(n, k) for n in range(batch) for k in active]
            mbs = _micro_batches(ss, units, 8, __import__("numpy").random.default_rng(seed))
            pol.train()
            for j, mb in enumerate(mbs):
                b = _batch(ss, mb, "cpu")
                lp, _ = _log_prob(b, _denoise(pol, b))
                loss, _ = ppo_clip_loss(lp, b["recorded_log_prob"], adv[[n for n, _ in mb]], 1e-4)
                (loss / per_step).backward()
                if (j + 1) % per_step == 0 or j == len(mbs) - 1:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return len(units)

        def old_pass() -> int:
            ss = samples()
            _embed_hints(pol, ss, "cpu")
            units = [(n, k) for n in range(batch) for k in active]
            with torch.no_grad():
                for mb in _micro_batches(ss, units, 16, __import__("numpy").random.default_rng(0)):
                    _log_prob(_batch(ss, mb, "cpu"), _denoise(pol, _batch(ss, mb, "cpu")))
            return len(units)

        group(0)
        t0 = time.perf_counter()
        units = sum(group(i + 1) for i in range(groups))
        secs = time.perf_counter() - t0
        t1 = time.perf_counter()
        old_units = old_pass()
        out["old_pass_units_per_s"] = old_units / (time.perf_counter() - t1)
    out.update({"units": units, "seconds": secs, "units_per_s": units / secs,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    return out


def run_one(cfg: tuple, a, model_dir: Path) -> dict:
    side, what, mode, scope = cfg
    common = ["--model-dir", str(model_dir), "--groups", str(a.groups), "--threads", "1"]
    if side == "ours":
        cmd = [sys.executable, __file__, "--worker", what, mode, scope, *common]
    else:
        cmd = [a.peer_python, str(ROOT / "bench" / "ddpo_peer_worker.py"), "--peer-src", a.peer_src,
               "--what", what, *common]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default="/work/peer/venv/bin/python")
    ap.add_argument("--peer-src", default="/work/peer/src")
    ap.add_argument("--model-dir", default=str(ROOT / "bench-out" / "side_by_side_model"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", type=int, default=2, help="timed AdamW steps (sampling batches) per configuration")
    ap.add_argument("--old-lora", action="store_true", help="also measure LoRA on every convolution (the old targets)")
    ap.add_argument("--out", default=None, help="also write the raw rows (JSON)")
    ap.add_argument("--report", default=None, help="only print the table of rows written by --out")
    ap.add_argument("--worker", nargs=3, metavar=("WHAT", "MODE", "SCOPE"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model_dir)
    if a.report:
        report(json.loads(Path(a.report).read_text()))
        return
    if a.worker:
        what, mode, scope = a.worker
        print(json.dumps(ours(model_dir, what, mode, scope, 8, 10, 5.0, a.groups)))
        return
    write_models(model_dir)
    configs = OURS + PEER + ([OLD_LORA] if a.old_lora else [])
    rows: list[dict] = []
    for r in range(a.rounds):
        k = r * 3 % len(configs)
        for cfg in configs[k:] + configs[:k]:  # interleaved, rotated: load drift hits both sides
            row = run_one(cfg, a, model_dir)
            row["round"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    report(rows)


def report(rows: list[dict]) -> None:
    def key(r):
        return ("ours" if r["side"] == "ours" else "peer", r["what"], r.get("mode", ""), r.get("scope", ""))

    med: dict[tuple, dict] = {}
    for kk in {key(r) for r in rows}:
        rs = [r for r in rows if key(r) == kk]
        med[kk] = {f: statistics.median(r[f] for r in rs) for f in ("units_per_s", "peak_rss_gb")}
        if "old_pass_units_per_s" in rs[0]:
            med[kk]["old"] = statistics.median(r["old_pass_units_per_s"] for r in rs)
        med[kk]["trainable"] = rs[0].get("trainable")
    peer_full = med[("peer", "train_full", "", "")]
    peer_lora = med[("peer", "train_lora", "", "")]
    print("\n| ours: what trains | trainable | units/s | peak RSS GB | vs ddpo-pytorch | units/s | "
          "peak RSS GB | ratio | ours incl. π_old pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, scope, peer_name, peer in (("full", "attention", "UNet full", peer_full),
                                         ("lora", "attention", "UNet LoRA", peer_lora),
                                         ("zero_convs", "attention", "UNet LoRA", peer_lora),
                                         ("lora", "all", "UNet LoRA", peer_lora)):
        if ("ours", "train", mode, scope) not in med:
            continue
        m = med[("ours", "train", mode, scope)]
        with_old = 1 / (1 / m["units_per_s"] + 1 / m["old"])
        label = f"ControlNet {mode}" + (" (LoRA on every conv, the old targets)" if scope == "all" else "")
        print(f"| {label} | {m['trainable']:,} | {m['units_per_s']:.1f} | {m['peak_rss_gb']:.2f} | {peer_name} | "
              f"{peer['units_per_s']:.1f} | {peer['peak_rss_gb']:.2f} | **{m['units_per_s'] / peer['units_per_s']:.2f}×** | "
              f"{with_old:.1f} ({with_old / peer['units_per_s']:.2f}×) |")
    s, p = med[("ours", "sample", "zero_convs", "attention")], med[("peer", "sample", "", "")]
    print(f"| sampling + log-prob recording (ours with the ControlNet) | | {s['units_per_s']:.1f} | "
          f"{s['peak_rss_gb']:.2f} | pipeline_with_logprob | {p['units_per_s']:.1f} | {p['peak_rss_gb']:.2f} | "
          f"**{s['units_per_s'] / p['units_per_s']:.2f}×** | |")


if __name__ == "__main__":
    main()
