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
        --peer-src /work/peer/src \\
        --out bench/results/ddpo_side_by_side.json --markdown bench/results/ddpo_side_by_side.md

``--report RUN.json --markdown PATH`` rewrites the report from a finished run (keeping the
hand-written notes below its marker); ``--breakdown`` times the parts of one micro-batch.

What is measured (one thread each, fp32, batch B = 8, T = 10 steps, CFG 5, 32×32 latents,
256² hint): every configuration in its own fresh process (so each peak RSS is its own), the
order rotated each round, the median over rounds reported.

* ours, ``train <mode>``: the trainer's own per-unit code (``rl.train._batch`` / ``_denoise`` /
  ``_log_prob``, ``rl.ddpo.ppo_clip_loss``, the hint embeddings cached by ``_embed_hints``),
  micro-batches of 8 (sample, step) units, one AdamW step per group of B × 9 stochastic steps = 72
  units (the peer: 80, it trains all 10 steps), grad-norm clip 1.0, on
  trajectories our sampler recorded. The ControlNet (strength 1) trains, the UNet is frozen.
  The time includes caching the hint embeddings. The trainer's π_old step over the same units
  (``rl.train._old_pass``; the peer has none: it trusts the sampled log-probs) is timed apart,
  both ways: ``recompute`` (a no-grad forward over every unit) and ``auto`` (π_old from the
  recorded predictions after a spot check proves them this policy's, the default).
* ddpo-pytorch, ``train full|lora``: ``bench/ddpo_peer_worker.py`` (its docstring says how).
* ``sample``: ours is ``rl.sampling.sample_loop`` over ``Policy.denoise`` with the ControlNet
  on and the log-prob recorded; the peer's is its ``pipeline_with_logprob`` (UNet only).

Units are samples·timesteps trained (or sampled) per second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = (32, 64)
BATCH, STEPS, CFG = 8, 10, 5.0
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
    from rl.weights import ensure_model_imports

    ensure_model_imports()
    from accelerate import Accelerator
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from rl.ddpo import ppo_clip_loss
    from rl.policy import LoraSettings, Policy
    from rl.sampling import initial_noise, sample_loop
    from rl.toy.model import sampling_schedule
    from rl.train import _batch, _denoise, _embed_hints, _log_prob, _micro_batches, _old_pass, _Sample

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

        start = {k: v.clone() for k, v in pol.state_dict().items()}
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

        def old_pass(how: str) -> float:
            """Seconds of the trainer's own π_old step (``rl.train._old_pass``) over the group's units."""
            ss = samples()
            _embed_hints(pol, ss, "cpu")
            units = [(n, k) for n in range(batch) for k in active]
            cfg = SimpleNamespace(old_log_probs=how, batch_size=8, kl_coef=0.0)
            data = {"samples": batch, "shards": 1, "shards_skipped": 0, "dropped_nonfinite_reward": 0,
                    "reward_mean": 0.0, "reward_std": 0.0, "shards_same_models": True}
            t1 = time.perf_counter()
            _old_pass(cfg, pol, ss, units, torch.device("cpu"), Accelerator(cpu=True), data, lambda m: None)
            secs = time.perf_counter() - t1
            assert data["old_log_probs"] == ("recorded" if how == "auto" else "recomputed"), data
            return secs

        group(0)
        t0 = time.perf_counter()
        units = sum(group(i + 1) for i in range(groups))
        secs = time.perf_counter() - t0
        pol.load_state_dict(start)  # π_old is the policy the trajectories were sampled with
        per_group = len(active) * batch
        out["old_pass_units_per_s"] = per_group / old_pass("recompute")
        out["old_auto_units_per_s"] = per_group / old_pass("auto")
    out.update({"units": units, "seconds": secs, "units_per_s": units / secs,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    return out


def breakdown(model_dir: Path, reps: int = 5) -> list[str]:
    """Where a micro-batch's time goes (8 units: 16 network rows with CFG), ours against the work
    the peer's update does, on this process's one thread: medians of ``reps`` runs, in ms.

    Why: the ratios above compare different work. The peer's update is one UNet forward and
    backward; ours adds the ControlNet's forward (and backward) and still needs the UNet's
    backward, through the decoder, to reach the residuals it adds. This splits the cost."""
    from rl.weights import ensure_model_imports

    ensure_model_imports()
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from rl.policy import LoraSettings, Policy

    info = json.loads((model_dir / "bench.json").read_text())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, LATENT, LATENT, generator=g)
    cond, uncond = torch.randn(8, CONTEXT_LEN, CONTEXT_DIM, generator=g), torch.randn(8, CONTEXT_LEN, CONTEXT_DIM, generator=g)
    hint = (torch.rand(8, 3, 8 * LATENT, 8 * LATENT, generator=g) > 0.5).to(torch.uint8) * 255
    sigma, t = torch.full((8,), 2.0), torch.full((8,), 500.0)

    def models():
        unet = UNet2DConditionModel(**info["unet_config"])
        unet.load_state_dict(load_file(str(model_dir / "unet.safetensors")))
        cn = ControlNetModel(**info["controlnet_config"])
        cn.load_state_dict(load_file(str(model_dir / "controlnet.safetensors")))
        return unet, cn

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    unet, _ = models()
    x2, t2, ctx = torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])

    def unet_fwd():
        with torch.no_grad():
            unet(x2, t2, encoder_hidden_states=ctx)

    def unet_step(trainable):
        def run():
            unet.requires_grad_(False)
            for n, p_ in unet.named_parameters():
                p_.requires_grad_(trainable(n))
            unet(x2, t2, encoder_hidden_states=ctx).sample.square().mean().backward()
            unet.zero_grad(set_to_none=True)
        return run

    rows = [("UNet forward, no grad (the peer's sampling step; ours without the ControlNet)", ms(unet_fwd)),
            ("UNet forward + backward, all UNet weights train (the peer's full update)", ms(unet_step(lambda n: True))),
            ("UNet forward + backward to the attention weights (the peer's LoRA update, without its LoRA)",
             ms(unet_step(lambda n: ".attn" in n)))]
    for mode in ("full", "lora", "zero_convs"):
        torch.manual_seed(0)
        pol = Policy(*models(), mode=mode, lora=LoraSettings(rank=8))
        emb = pol.embed_hint(hint) if pol.hint_embedding_frozen() else None

        def fwd(pol=pol, emb=emb):
            with torch.no_grad():
                pol.denoise(x, sigma, t, cond, uncond, hint, 1.0, 5.0, hint_embedding=emb)

        def step(pol=pol, emb=emb):
            pol.denoise(x, sigma, t, cond, uncond, hint, 1.0, 5.0, hint_embedding=emb).square().mean().backward()
            pol.zero_grad(set_to_none=True)

        cache = " (hint embedding cached)" if emb is not None else " (hint encoder runs: it trains)"
        rows.append((f"ours {mode}: ControlNet + UNet forward, no grad{cache}", ms(fwd)))
        rows.append((f"ours {mode}: forward + backward{cache}", ms(step)))
        if mode == "full":
            with torch.no_grad():
                rows.append(("hint embedding of 8 hints (256², once per sample when frozen)",
                             ms(lambda pol=pol: pol.embed_hint(hint))))
    return ["| one micro-batch (8 units, CFG: 16 rows) | ms |", "|---|---|",
            *(f"| {name} | {v:.0f} |" for name, v in rows)]


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


def peer_fingerprint(peer_src: Path) -> str:
    """sha256 over the peer package's Python files (its folder is not a git checkout here)."""
    h = hashlib.sha256()
    for f in sorted((peer_src / "ddpo_pytorch").rglob("*.py")):
        h.update(str(f.relative_to(peer_src)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores shared with other jobs, 1 thread per process"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default="/work/peer/venv/bin/python")
    ap.add_argument("--peer-src", default="/work/peer/src")
    ap.add_argument("--peer-commit", default="1958463", help="the peer checkout's commit, for the report")
    ap.add_argument("--model-dir", default=str(ROOT / "bench-out" / "side_by_side_model"))
    ap.add_argument("--rounds", type=int, default=2, help="2 rounds: ~35 min on 1 shared thread")
    ap.add_argument("--groups", type=int, default=1, help="timed AdamW steps (sampling batches) per configuration")
    ap.add_argument("--old-lora", action="store_true", help="also measure LoRA on every convolution (the old targets)")
    ap.add_argument("--out", default=None, help="also write the raw rows and the run's settings (JSON)")
    ap.add_argument("--markdown", default=None, help="also write the report (table, date, machine, versions) here")
    ap.add_argument("--report", default=None, help="only print (and --markdown) the report of a run written by --out")
    ap.add_argument("--breakdown", action="store_true", help="only time the parts of one micro-batch (ms)")
    ap.add_argument("--worker", nargs=3, metavar=("WHAT", "MODE", "SCOPE"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model_dir)
    if a.report:
        run = json.loads(Path(a.report).read_text())
        emit(run["meta"], run["rows"], a.markdown)
        return
    if a.breakdown:
        write_models(model_dir)
        print("\n".join(breakdown(model_dir)))
        return
    if a.worker:
        what, mode, scope = a.worker
        print(json.dumps(ours(model_dir, what, mode, scope, BATCH, STEPS, CFG, a.groups)))
        return
    import diffusers

    write_models(model_dir)
    configs = OURS + PEER + ([OLD_LORA] if a.old_lora else [])
    meta = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
            "load_start": os.getloadavg()[0], "rounds": a.rounds, "groups": a.groups,
            "ours": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "peer_commit": a.peer_commit, "peer_src_sha256": peer_fingerprint(Path(a.peer_src)),
            "model": json.loads((model_dir / "bench.json").read_text()),
            "settings": {"batch": BATCH, "steps": STEPS, "cfg": CFG, "latent": LATENT, "hint": 8 * LATENT}}
    t_run = time.perf_counter()
    rows: list[dict] = []
    for r in range(a.rounds):
        k = r * 3 % len(configs)
        for cfg in configs[k:] + configs[:k]:  # interleaved, rotated: load drift hits both sides
            row = run_one(cfg, a, model_dir)
            row["round"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:  # written as it goes: a cut-off run keeps its rows
                meta["wall_s"] = time.perf_counter() - t_run
                Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    meta["wall_s"] = time.perf_counter() - t_run
    meta["load_end"] = os.getloadavg()[0]
    meta["peer_versions"] = next((r["versions"] for r in rows if "versions" in r), {})
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    emit(meta, rows, a.markdown)


NOTES_MARKER = "<!-- written by hand below this line; --markdown keeps it -->"


def emit(meta: dict, rows: list[dict], markdown: str | None) -> None:
    table = report(rows)
    print("\n" + "\n".join(table))
    if markdown:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        # what follows the marker (the targets and their measured causes) is written by hand: kept
        kept = path.read_text().partition(NOTES_MARKER)[2] if path.is_file() else ""
        path.write_text(render_markdown(meta, rows, table) + "\n" + NOTES_MARKER + kept)


def render_markdown(meta: dict, rows: list[dict], table: list[str]) -> str:
    st, m = meta["settings"], meta["model"]
    pv = ", ".join(f"{k} {v}" for k, v in meta.get("peer_versions", {}).items())
    return "\n".join([
        "# This project's DDPO update and sampler next to ddpo-pytorch's",
        "",
        "Generated by `bench/ddpo_side_by_side.py --markdown` from one complete run (issue 22); "
        "the numbers are medians over the rounds.",
        "",
        f"- date: {meta['started']}; wall time of the run: {meta['wall_s'] / 60:.1f} min; "
        f"load average (1 min) at start {meta['load_start']:.2f}, at end {meta.get('load_end', float('nan')):.2f}",
        f"- machine: {meta['machine']}",
        f"- this project: torch {meta['ours']['torch']}, diffusers {meta['ours']['diffusers']}",
        f"- ddpo-pytorch: commit {meta['peer_commit']} (source folder sha256 {meta['peer_src_sha256']}), "
        f"run unmodified from its own venv: {pv}",
        f"- configuration: shared tiny UNet ({m['unet_params']:,} params; our ControlNet {m['controlnet_params']:,}), "
        f"{st['latent']}×{st['latent']} latents, {st['hint']}² hint, batch {st['batch']}, T = {st['steps']} steps, "
        f"CFG {st['cfg']:g}, fp32, micro-batches of 8 units, one AdamW step per B·T units (ours: the 9 stochastic "
        f"steps, 72 units; the peer: all 10, 80 units), grad-norm clip 1.0; {meta['rounds']} rounds × "
        f"{len({(r['side'], r['what'], r.get('mode', ''), r.get('scope', '')) for r in rows})} configurations, "
        f"each in its own fresh process, order rotated per round; per configuration one warm-up group, then "
        f"{meta['groups']} timed group(s)",
        "- units: samples·timesteps trained (or sampled) per second; peak RSS: the process's high-water mark",
        "",
        *table,
        "",
        "Every row of the run (units/s per round; the medians above are over these):",
        "",
        *per_round(rows),
        "",
    ])


def per_round(rows: list[dict]) -> list[str]:
    rounds = sorted({r["round"] for r in rows})
    out = ["| configuration | " + " | ".join(f"round {i + 1}" for i in rounds) + " | peak RSS GB (highest) |",
           "|---|" + "---|" * len(rounds) + "---|"]
    names: dict[str, list[dict]] = {}
    for r in rows:
        name = (f"ours {r['what']} {r['mode']}" + (f" ({r['scope']})" if r["scope"] != "attention" else "")
                if r["side"] == "ours" else f"ddpo-pytorch {r['what']}")
        names.setdefault(name, []).append(r)
    for name, rs in names.items():
        by = {r["round"]: r for r in rs}
        cells = " | ".join(f"{by[i]['units_per_s']:.2f}" if i in by else "" for i in rounds)
        out.append(f"| {name} | {cells} | {max(r['peak_rss_gb'] for r in rs):.2f} |")
    return out


def report(rows: list[dict]) -> list[str]:
    def key(r):
        return ("ours" if r["side"] == "ours" else "peer", r["what"], r.get("mode", ""), r.get("scope", ""))

    med: dict[tuple, dict] = {}
    for kk in {key(r) for r in rows}:
        rs = [r for r in rows if key(r) == kk]
        med[kk] = {f: statistics.median(r[f] for r in rs) for f in ("units_per_s", "peak_rss_gb")}
        for field, name in (("old_pass_units_per_s", "old"), ("old_auto_units_per_s", "old_auto")):
            if all(field in r for r in rs):
                med[kk][name] = statistics.median(r[field] for r in rs)
        med[kk]["trainable"] = rs[0].get("trainable")
    peer_full = med[("peer", "train_full", "", "")]
    peer_lora = med[("peer", "train_lora", "", "")]
    auto = all("old_auto" in m for k, m in med.items() if k[1] == "train" and k[0] == "ours")
    lines = ["| ours: what trains | trainable | units/s | peak RSS GB | vs ddpo-pytorch | units/s | "
             "peak RSS GB | ratio | ours incl. a full π_old pass over the same units |"
             + (" ours incl. π_old from the recording (auto) |" if auto else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if auto else "")]

    def with_pass(m: dict, peer: dict, key: str) -> str:
        u = 1 / (1 / m["units_per_s"] + 1 / m[key])
        return f"{u:.2f} ({u / peer['units_per_s']:.2f}×) |"

    for mode, scope, peer_name, peer in (("full", "attention", "UNet full", peer_full),
                                         ("lora", "attention", "UNet LoRA", peer_lora),
                                         ("zero_convs", "attention", "UNet LoRA", peer_lora),
                                         ("lora", "all", "UNet LoRA", peer_lora)):
        if ("ours", "train", mode, scope) not in med:
            continue
        m = med[("ours", "train", mode, scope)]
        label = f"ControlNet {mode}" + (" (LoRA on every conv, the old targets)" if scope == "all" else "")
        lines.append(f"| {label} | {m['trainable']:,} | {m['units_per_s']:.2f} | {m['peak_rss_gb']:.2f} | {peer_name} | "
              f"{peer['units_per_s']:.2f} | {peer['peak_rss_gb']:.2f} | **{m['units_per_s'] / peer['units_per_s']:.2f}×** | "
              + with_pass(m, peer, "old") + (" " + with_pass(m, peer, "old_auto") if auto else ""))
    s, p = med[("ours", "sample", "zero_convs", "attention")], med[("peer", "sample", "", "")]
    lines.append(f"| sampling + log-prob recording (ours with the ControlNet) | | {s['units_per_s']:.2f} | "
          f"{s['peak_rss_gb']:.2f} | pipeline_with_logprob | {p['units_per_s']:.2f} | {p['peak_rss_gb']:.2f} | "
          f"**{s['units_per_s'] / p['units_per_s']:.2f}×** | |" + (" |" if auto else ""))
    return lines


if __name__ == "__main__":
    main()
