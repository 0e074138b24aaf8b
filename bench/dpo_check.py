"""Is a Diffusion-DPO-style preference objective signal on the toy? A prototype, not a trainer objective.

The check of ``bench/gradient_check.py`` (cosine between the updates of two disjoint halves of a
batch), applied to preference pairs. Pairs come from the demo's mirrored exploration: two
samples with the same prompt, payload and seed (so the same initial and per-step noise), whose
strength curves differ by ±δ in the learned curve's two numbers; the winner is the sample with
the higher reward (scan + 0.5 × art). Rounds are drawn as ``qr-rl demo`` draws them at the demo
strength, with module feedback and luma-only control.

Two preference objectives, both against the frozen pretrained ControlNet as the reference:

``dpo-traj``  −log σ(β Σ_k [(log π_θ − log π_ref)(x_{k+1}^w | x_k^w) − (same for l)]) on the
              recorded stochastic steps, π the sampler that recorded them (gain maps, luma-only
              control, recorded strengths). Per-step (one sigmoid per step, as Diffusion-DPO's
              per-timestep loss) and summed versions have the same gradient at θ = ref (every
              sigmoid is at 0), so the halves' cosine is one number for both.
``dpo-x0``    Diffusion-DPO's own form: the final latents x0^w, x0^l noised to each recorded
              sigma with one fresh noise shared by the pair, and the plain ControlNet (one
              strength, no gain map: what a stock sampler runs) scored by its denoising error,
              −log σ(−β Σ_k [(e_θ − e_ref)(w) − (e_θ − e_ref)(l)]).

Both are compared with ``ddpo`` (ratio 1) and ``rwr`` (β = 1) on the same samples. Every
per-sample gradient over the full ControlNet is computed once at the pretrained weights and
kept, so any number of random splits is a sum; the zero convolutions' cosine is the slice of
those coordinates (their gradient does not depend on which other weights train).

A high cosine is not yet a signal from the preference: two controls say what it is made of.
The same pairs under one fixed random labelling (the null: the halves agree only if the
per-pair gradients share a direction whatever the labels), and the share of the per-pair
gradients' energy in their top singular direction; and the update under the label "the sample
with more ControlNet strength wins" (its cosine to the preference's update).
If a preference objective passes (mean cosine ≥ 0.3 at 32 pairs a half, a demo round),
the learning check runs a few AdamW steps of it on one round's pairs and measures the plain
sampler before and after on 64 fixed items (``rl.toy.measure``), next to the dial (the
pretrained ControlNet at higher strengths on the same items).

About 12 minutes at one thread on busy cores (2 of them collecting, 4-8 the gradients, 5 the
learning check); a second run reuses the shards. Results and why: docs/research-log.md,
"2026-12-07: Diffusion-DPO on trajectory pairs (prototype)".

    OMP_NUM_THREADS=1 python bench/dpo_check.py --out bench-out/dpo-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PASS = 0.3
X0_WEIGHTING = "d"  # dpo-x0's error: "d" (‖D − x0‖², every noise level alike) | "eps" (÷ σ², Diffusion-DPO's ε-MSE)


def collect(model, out: Path, rounds: int, pair_source: str, say) -> Path:
    """Demo-style rounds with mirrored pairs (same seed, curve or feedback gains ±δ), once."""
    from rl.files import sha256_file
    from rl.schedule_policy import SchedulePolicy
    from rl.toy.demo import DemoConfig, collect_round

    shards = out / f"shards-{pair_source}"
    if shards.exists():
        return shards
    cfg = DemoConfig(out=out, learn_schedule=True, mirrored=True, train_controlnet=True,
                     learn_feedback=pair_source == "gains")
    scorer, sha = model.clip_scorer(), sha256_file(model.unet_path)
    t0 = time.perf_counter()
    for r in range(rounds):
        if pair_source == "curve":
            schedule = SchedulePolicy(model.steps, sigma=cfg.schedule_sigma, lr=cfg.schedule_lr, shape=cfg.schedule_shape)
            gains = None
        else:  # the base strength on every step, the two feedback gains explored in pairs
            schedule = None
            gains = SchedulePolicy(2, sigma=cfg.schedule_sigma, lr=cfg.schedule_lr, max_strength=10.0)
        row, _ = collect_round(model, None, model.controlnet_path, model.demo_strength, r, cfg, shards / f"r{r}",
                               scorer, sha, schedule=schedule, feedback_gains=gains)
        say(f"round {r}: decode {row['decode_rate']:.2f}, art {row['art_similarity']:.3f}")
    say(f"{64 * rounds} samples collected in {time.perf_counter() - t0:.0f} s")
    return shards


def _unit_batch(samples, n: int, steps: list[int], policy):
    """One sample's steps as one micro-batch, its hint embedded once (with grad: full mode trains the encoder)."""
    from rl.train import _batch

    b = _batch(samples, [(n, k) for k in steps], "cpu")
    emb = policy.embed_hint(b["hint"][:1])
    b["hint_embedding"] = emb.expand(len(steps), *emb.shape[1:])
    return b


def pair_noise(pair: int, shape):
    """dpo-x0: the fresh noise of a pair, one per step, the same for its winner and loser (as Diffusion-DPO)."""
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + pair))


def unit_values(kind: str, policy, samples, n: int, projection, strength: float):
    """Per-step values whose sum's gradient the objectives need: ``lp`` log π of the recorded
    step (the recording sampler), ``rwr`` the plain ControlNet's squared error to the recorded
    prediction, ``x0`` its denoising error on the final latent noised with the pair's noise."""
    from rl.train import _denoise, _log_prob, _plain_denoise

    s = samples[n]
    if kind == "lp":
        steps = list(s.active)
        policy.control_projection = projection
        b = _unit_batch(samples, n, steps, policy)
        return _log_prob(b, _denoise(policy, b))[0]
    policy.control_projection = None
    steps = [k for k in range(len(s.std)) if float(s.strength[k]) > 0]
    b = _unit_batch(samples, n, steps, policy)
    if kind == "rwr":
        d = _plain_denoise(policy, b, strength)
        return (d - b["recorded_denoised"]).pow(2).flatten(1).mean(1)
    x0 = s.x[-1].float()[None]
    eps = pair_noise(n // 2, (len(s.std), *x0.shape[1:]))[steps]
    b["x"] = x0 + b["sigma"].view(-1, 1, 1, 1) * eps
    d = _plain_denoise(policy, b, strength)
    err = (d - x0).pow(2).flatten(1).mean(1)
    return err / b["sigma"].pow(2) if X0_WEIGHTING == "eps" else err


def per_sample_gradients(kind: str, policy, params, samples, projection, strength: float, say):
    import torch

    t0 = time.perf_counter()
    out = torch.zeros(len(samples), sum(p.numel() for p in params))
    for n in range(len(samples)):
        for p in params:
            p.grad = None
        unit_values(kind, policy, samples, n, projection, strength).sum().backward()
        out[n] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    say(f"{kind}: {len(samples)} per-sample gradients in {time.perf_counter() - t0:.0f} s")
    return out


def load(model, shards: Path):
    from rl.luma_control import projection_from_meta
    from rl.policy import load_policy
    from rl.train import TrainConfig, _load_data

    tc = TrainConfig(trajectories=[str(shards)], checkpoint=model.unet_path, controlnet=model.controlnet_path,
                     out=shards / "unused.safetensors", unet_config=model.unet_config_path,
                     controlnet_config=model.controlnet_config_path, mode="full", objective="ddpo",
                     min_group_size=8, cpu=True, progress=False)
    loaded = load_policy(tc.checkpoint, tc.controlnet, unet_config=tc.unet_config,
                         controlnet_config=tc.controlnet_config, mode="full")
    samples, keys, data = _load_data(tc, loaded.base_sha256, loaded.controlnet_sha256, print)
    if data["dropped_nonfinite_reward"]:
        raise SystemExit("a sample was dropped: the pairs no longer line up")
    for i in range(0, len(samples), 2):
        if not samples[i].x[0].equal(samples[i + 1].x[0]):  # one seed: the same initial noise
            raise SystemExit(f"samples {i} and {i + 1} are not a same-seed pair")
    from rl.trajectory import TrajectoryDataset

    decoded = [bool(v) for t in TrajectoryDataset([str(shards)]) for v in t.reward_components["decoded"].tolist()]
    return loaded.policy, samples, keys, projection_from_meta(data["luma_control"]), decoded


def effective_strength(s) -> float:
    """A sample's mean ControlNet strength over its steps and positions (its curve × its feedback gain map)."""
    gain = 1.0 if s.strength_map is None else s.strength_map.float().flatten(1).mean(1)
    return float((s.strength.float() * gain).mean())


def learning_check(model, policy, samples, pairs, kind: str, projection, args, say) -> dict:
    """A few AdamW steps of the preference objective on one round's pairs; the plain sampler at the
    demo strength before and after on 64 fixed items."""
    import torch

    from rl.toy.model import measure

    strength = model.demo_strength
    seeds = list(range(50_000, 50_064))
    scorer = model.clip_scorer()
    before = measure(model, strength, seeds, controlnet=None, scorer=scorer)
    value_kind = "lp" if kind == "dpo-traj" else "x0"
    sign = 1.0 if kind == "dpo-traj" else -1.0  # log π rises for the winner; the error falls
    with torch.no_grad():
        ref = {n: unit_values(value_kind, policy, samples, n, projection, strength).detach()
               for win, lose in pairs for n in (win, lose)}
    params = [p for p in policy.controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learn_lr, weight_decay=0.0)
    rng = np.random.default_rng(1)
    t0, losses = time.perf_counter(), []
    epoch_loss = []
    for _ in range(args.learn_epochs):
        order = rng.permutation(len(pairs))
        epoch_loss.append(0.0)
        for i in range(0, len(order), args.learn_batch):
            opt.zero_grad()
            total = 0.0
            for j in order[i:i + args.learn_batch]:
                win, lose = pairs[j]
                dw = unit_values(value_kind, policy, samples, win, projection, strength) - ref[win]
                dl = unit_values(value_kind, policy, samples, lose, projection, strength) - ref[lose]
                if args.per_step:
                    loss = -torch.nn.functional.logsigmoid(sign * args.beta * (dw - dl)).mean()
                else:
                    loss = -torch.nn.functional.logsigmoid(sign * args.beta * (dw - dl).sum())
                (loss / args.learn_batch).backward()
                total += loss.item() / args.learn_batch
                epoch_loss[-1] += loss.item() / len(pairs)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(total)
    with torch.no_grad():  # the training pairs the tuned file ranks the right way round
        margins = [float(sign * ((unit_values(value_kind, policy, samples, w, projection, strength) - ref[w])
                                 - (unit_values(value_kind, policy, samples, lo, projection, strength) - ref[lo])).sum())
                   for w, lo in pairs]
    say(f"{kind}: {len(losses)} AdamW steps in {time.perf_counter() - t0:.0f} s; loss per epoch "
        f"{', '.join(f'{v:.3f}' for v in epoch_loss)}; training pairs ranked right {np.mean(np.array(margins) > 0):.0%}")
    policy.control_projection = None
    after = measure(model, strength, seeds, controlnet=policy.controlnet, scorer=scorer,
                    base_images=before["base_images"])
    pick = ("decode_rate", "module_accuracy", "art_similarity")
    dial = [measure(model, s, seeds, scorer=scorer, base_images=before["base_images"]) for s in args.dial]
    return {"objective": kind, "steps": len(losses), "epoch_loss": epoch_loss, "beta": args.beta, "lr": args.learn_lr,
            "per_step": args.per_step, "pairs_ranked_right": float(np.mean(np.array(margins) > 0)),
            "before": {k: before[k] for k in pick}, "after": {k: after[k] for k in pick},
            "dial": [{"strength": s} | {k: m[k] for k in pick} for s, m in zip(args.dial, dial)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/dpo-check")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of 64 samples (32 pairs) (default 2)")
    ap.add_argument("--pairs-source", dest="pair_source", choices=("curve", "gains"), default="curve",
                    help="what a pair's two samples differ in: the strength curve ±δ (default) or the feedback gains ±δ")
    ap.add_argument("--sizes", default="8,16,32", help="half sizes in pairs (default 8,16,32)")
    ap.add_argument("--splits", type=int, default=16, help="random disjoint pairs of halves per size (default 16)")
    ap.add_argument("--learn", choices=("auto", "always", "never"), default="auto",
                    help="the learning check: only when a preference objective passes (auto)")
    ap.add_argument("--beta", type=float, default=50.0, help="DPO temperature in the learning check (default 50)")
    ap.add_argument("--per-step", action="store_true", help="learning check: one sigmoid per step (Diffusion-DPO)")
    ap.add_argument("--learn-lr", type=float, default=1e-4)
    ap.add_argument("--learn-epochs", type=int, default=4)
    ap.add_argument("--learn-batch", type=int, default=4, help="pairs per AdamW step")
    ap.add_argument("--dial", type=lambda v: [float(x) for x in v.split(",") if x], default=[0.55, 0.6, 0.7],
                    help="learning check: the pretrained ControlNet at these strengths too (the dial, same items)")
    ap.add_argument("--learn-only", action="store_true", help="skip the gradient check; only the learning check")
    ap.add_argument("--x0-weighting", choices=("d", "eps"), default="d",
                    help="dpo-x0's error: in D-space (default) or Diffusion-DPO's ε-MSE (÷ σ²: the late steps count)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from rl.ddpo import StatTracker
    from rl.objectives import advantage_weights
    from rl.policy import zero_conv_parameters
    from rl.toy.model import ToyModel

    global X0_WEIGHTING
    X0_WEIGHTING = args.x0_weighting
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    model = ToyModel.load()
    shards = collect(model, out, args.rounds, args.pair_source, say)
    policy, samples, keys, projection, decoded = load(model, shards)
    rewards = np.array([s.reward for s in samples])
    pairs, ties = [], 0
    for i in range(0, len(samples), 2):
        if rewards[i] == rewards[i + 1]:
            ties += 1
        else:
            pairs.append((i, i + 1) if rewards[i] > rewards[i + 1] else (i + 1, i))
    gaps = np.array([rewards[win] - rewards[lose] for win, lose in pairs])
    say(f"{len(pairs)} pairs ({ties} ties dropped); reward gap in a pair {gaps.mean():.3f} "
        f"(median {np.median(gaps):.3f}); reward std over samples {rewards.std():.3f}")

    strength = model.demo_strength
    result: dict = {"pair_source": args.pair_source, "pairs": len(pairs), "ties": ties}
    passing: list[str] = []
    table = ""
    if not args.learn_only:
        params = [p for p in policy.controlnet.parameters() if p.requires_grad]
        zc = zero_conv_parameters(policy.controlnet)
        mask = torch.cat([torch.full((p.numel(),), name in zc) for name, p in policy.controlnet.named_parameters()
                          if p.requires_grad])
        g = {kind: per_sample_gradients(kind, policy, params, samples, projection, strength, say)
             for kind in ("lp", "rwr", "x0")}
        adv = StatTracker(min_group_size=8, clip=5.0).update(keys, rewards)
        a = torch.as_tensor(adv.values, dtype=torch.float32) * torch.as_tensor(adv.mask, dtype=torch.float32)
        wts = advantage_weights(adv.values, adv.mask, 1.0)

        def update(objective: str, half: list[int]) -> torch.Tensor:
            """The loss gradient of ``objective`` over the pairs ``half`` (its samples for ddpo and rwr)."""
            w = torch.tensor([pairs[p][0] for p in half])
            lo = torch.tensor([pairs[p][1] for p in half])
            both = torch.cat([w, lo])
            if objective == "dpo-traj":
                return (g["lp"][lo] - g["lp"][w]).sum(0)
            if objective == "dpo-x0":
                return (g["x0"][w] - g["x0"][lo]).sum(0)
            if objective == "ddpo":
                return -(a[both, None] * g["lp"][both]).sum(0)
            return (wts[both, None] * g["rwr"][both]).sum(0)

        def cos(x: torch.Tensor, y: torch.Tensor) -> float:
            return float(torch.nn.functional.cosine_similarity(x, y, dim=0))

        rng = np.random.default_rng(0)
        sizes = [int(s) for s in args.sizes.split(",") if 0 < int(s) <= len(pairs) // 2]
        splits = {size: [rng.permutation(len(pairs)) for _ in range(args.splits)] for size in sizes}
        rows = []
        for objective in ("dpo-traj", "dpo-x0", "ddpo", "rwr"):
            for size in sizes:
                full, zero = [], []
                for perm in splits[size]:
                    ua, ub = update(objective, perm[:size].tolist()), update(objective, perm[size:2 * size].tolist())
                    full.append(cos(ua, ub))
                    zero.append(cos(ua[mask], ub[mask]))
                rows.append({"objective": objective, "pairs": size, "samples": 2 * size,
                             "full_mean": float(np.mean(full)), "full_sd": float(np.std(full)),
                             "zero_convs_mean": float(np.mean(zero)), "zero_convs_sd": float(np.std(zero)),
                             "zero_convs_first2": float(np.mean(zero[:2]))})
        lines = [f"| objective | half = {' | '.join(f'{s} pairs ({2 * s} samples)' for s in sizes)} |",
                 "|---|" + "---|" * len(sizes)]
        for objective in ("dpo-traj", "dpo-x0", "ddpo", "rwr"):
            for scope, key in (("zero convs", "zero_convs"), ("full", "full")):
                cells = [f"{r[key + '_mean']:.2f} ± {r[key + '_sd']:.2f}" for r in rows
                         if r["objective"] == objective]
                lines.append(f"| {objective}, {scope} | {' | '.join(cells)} |")
        table = "\n".join(lines)
        print(f"\ncosine between two disjoint halves' updates, mean ± sd over {args.splits} splits\n")
        print(table)
        result |= {"rows": rows, "reward_gap_mean": float(gaps.mean()), "reward_std": float(rewards.std())}

        # What the consistency is made of: a fixed random relabelling of the pairs (the null: no
        # common direction unless the labels carry one) and the label "the stronger sample wins"
        # (does the preference say more than "more strength"?), strength as the sampler applied it.
        flips = torch.as_tensor(np.random.default_rng(1).choice([-1.0, 1.0], len(pairs)), dtype=torch.float32)
        stronger = [effective_strength(samples[w]) > effective_strength(samples[lo]) for w, lo in pairs]
        decisive = [decoded[w] != decoded[lo] for w, lo in pairs]
        diff = torch.stack([g["x0"][w] - g["x0"][lo] for w, lo in pairs])  # dpo-x0's per-pair loss gradient
        shuffled = []
        for size in sizes:
            vals = []
            for perm in splits[size]:
                ha, hb = perm[:size], perm[size:2 * size]
                vals.append(cos((flips[ha, None] * diff[ha]).sum(0), (flips[hb, None] * diff[hb]).sum(0)))
            shuffled.append(f"{np.mean(vals):.2f} ± {np.std(vals):.2f}")
        print(f"| dpo-x0, full, random labels (the null) | {' | '.join(shuffled)} |")
        sign = torch.tensor([1.0 if s else -1.0 for s in stronger])
        everything = {"dpo-x0": diff.sum(0), "dpo-x0, the stronger sample wins": (sign[:, None] * diff).sum(0),
                      "rwr": update("rwr", list(range(len(pairs)))), "dpo-traj": update("dpo-traj", list(range(len(pairs))))}
        say(f"the stronger sample (mean strength × gain map) wins {np.mean(stronger):.0%} of the pairs; decode differs in {np.mean(decisive):.0%}")
        for name in ("dpo-x0, the stronger sample wins", "rwr", "dpo-traj"):
            say(f"cosine over all pairs, dpo-x0 vs {name}: {cos(everything['dpo-x0'], everything[name]):.2f}")
        # how one-dimensional the per-pair differences are: the top singular direction's share of their energy
        energy = torch.linalg.eigvalsh(diff.double() @ diff.double().T).flip(0).clamp(min=0)
        top = float(energy[0] / energy.sum())
        say(f"dpo-x0: the top direction holds {top:.0%} of the per-pair gradients' energy (top 3: "
            f"{float(energy[:3].sum() / energy.sum()):.0%})")
        result["top_direction_share"] = top
        result["stronger_wins"] = float(np.mean(stronger))
        result["decisive"] = float(np.mean(decisive))
        result["cos_x0_vs_stronger"] = cos(everything["dpo-x0"], everything["dpo-x0, the stronger sample wins"])
        result["cos_x0_vs_rwr"] = cos(everything["dpo-x0"], everything["rwr"])
        result["shuffled"] = shuffled

        demo = max(sizes)
        passing = [r["objective"] for r in rows if r["objective"].startswith("dpo") and r["pairs"] == demo
                   and max(r["full_mean"], r["zero_convs_mean"]) >= PASS]
        say(f"preference objectives passing at {demo} pairs: {passing or 'none'}")
    if args.learn == "always" or (args.learn == "auto" and passing) or args.learn_only:
        kind = passing[0] if passing else "dpo-x0"
        round0 = [p for p in pairs if p[0] < 64]
        learned = learning_check(model, policy, samples, round0, kind, projection, args, say)
        result["learning"] = learned
        print(f"\nlearning check ({kind}, {learned['steps']} steps on {len(round0)} pairs), plain sampler at "
              f"{strength}, 64 items:\n| | decode | art |\n|---|---|---|")
        for when in ("before", "after"):
            m = learned[when]
            print(f"| {when} | {m['decode_rate']:.0%} | {m['art_similarity']:.3f} |")
        for m in learned["dial"]:
            print(f"| the dial: pretrained at {m['strength']} | {m['decode_rate']:.0%} | {m['art_similarity']:.3f} |")
    tag = args.pair_source + ("-eps" if args.x0_weighting == "eps" else "") + (f"-learn-b{args.beta:g}-lr{args.learn_lr:g}{'-per-step' if args.per_step else ''}"
                              if args.learn_only else "")
    (out / f"dpo_check-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    if table:
        (out / f"dpo_check-{tag}.md").write_text(table + "\n")
    say("done")


if __name__ == "__main__":
    main()
