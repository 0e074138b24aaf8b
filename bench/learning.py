"""The miniature of the paper's table: does RL + curriculum make the toy model's QR art scan?

Arms, each with ``--seeds`` seeds, evaluated at the toy model's demo strength on the
same fixed evaluation set (``rl.toy.eval_prompts_codes``):

  (a) pretrained   the shipped ControlNet, no training;
  (b) rl-flat      RL (``qr-rl demo`` machinery) with every round at the demo strength;
  (c) rl-curric    RL with the demo's linear curriculum (``ToyModel.curriculum_start`` → demo
                   strength, then ``hold_rounds`` at the demo strength); the art budget's
                   paired floor follows the round's base strength down;
  (d) best-of-N    the pretrained ControlNet, N draws per evaluation item, keep the best
                   scan score ("draw until it scans"); N = the RL arms' training samples ÷
                   evaluation items, so (d) spends the same number of samples;
  (e) the dial     the pretrained ControlNet at the demo strength + 0.1 and + 0.2: what RL
                   has to beat. Raising the strength also buys decode with art, so RL earns
                   its keep only where it ends *above* this curve (more decode at the same art);
  (f) + DDPO       as (h), also fine-tuning the ControlNet's zero convolutions with DDPO on
                   each round's shards (``--train-controlnet``; not in the default arms: ≈ 2.5×
                   the time of (b));
  (g) feedback     the pretrained ControlNet at the demo strength with module feedback at its
                   starting gains (rl.module_feedback) and luma-only control (rl.luma_control),
                   nothing learned: what RL starts from;
  (h) curve only   as (b) without module feedback (the demo before module feedback);
  (i), (j)         (b) and (c) with ``--train-controlnet``: DDPO on the zero convolutions, replaying
                   module feedback and luma-only control (not in the default arms: ≈ 2.5× (b)).

The RL arms run the demo's defaults: the learned strength curve (rl.schedule_policy: a level
and a tilt over the steps, explored in mirrored pairs) on top of module feedback at its fixed gains and
luma-only control, with the art budget
(rl.art_budget.LevelBudget: the curve's level holds each round's mean art on a paired floor). The "mean strength" column is the ControlNet
strength averaged over the sampling steps at evaluation.

Prints decode rate, module accuracy and art similarity as mean ± std over seeds, and writes
``--out/learning.json`` and ``--out/learning.md``. With the defaults this is 6 demo runs plus
best-of-N (≈ 1 CPU-hour; run arms in parallel with ``--arms``); ``--rounds/--groups`` scale it down.

    python bench/learning.py --out bench-out/learning
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def best_of_n(model, n: int, eval_samples: int, seed: int, scorer) -> dict[str, float]:
    """Per evaluation item: N seeds at the demo strength, keep the draw with the best scan score."""
    from rl.scan import scan_reward
    from rl.toy.model import eval_prompts_codes, images_hwc_uint8, sample

    prompts, codes, _ = eval_prompts_codes(eval_samples)
    eval_seeds = list(range(50_000 + 1000 * seed, 50_000 + 1000 * seed + eval_samples))
    best_score = np.full(eval_samples, -1.0)
    best = {"decoded": np.zeros(eval_samples), "module_accuracy": np.zeros(eval_samples),
            "clip_image": np.zeros(eval_samples)}
    for j in range(n):
        seeds = [s + 7_919 * j for s in eval_seeds]  # draw j of item i (j = 0 is the evaluation seed)
        out = sample(model, prompts, codes, seeds, model.demo_strength, record=False)
        base = sample(model, prompts, None, seeds, 0.0, record=False).images  # the art of *this* draw
        scan = scan_reward(images_hwc_uint8(out.images), codes)
        art = model.art_reward(out.images, prompts, base, scorer)
        better = scan.total > best_score
        best_score = np.where(better, scan.total, best_score)
        for k in ("decoded", "module_accuracy"):
            best[k] = np.where(better, scan.components[k], best[k])
        best["clip_image"] = np.where(better, art.components["clip_image"], best["clip_image"])
    return {"decode_rate": float(best["decoded"].mean()), "module_accuracy": float(best["module_accuracy"].mean()),
            "art_similarity": float(best["clip_image"].mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/learning", help="folder for the runs and the table")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed (default 0): split one benchmark across processes, e.g. --seeds 1 --first-seed 2")
    ap.add_argument("--rounds", type=int, default=None, help="RL rounds per run (default: the demo's)")
    ap.add_argument("--groups", type=int, default=None, help="groups per round (default: the demo's)")
    ap.add_argument("--group-size", type=int, default=None, help="seeds per group (default: the demo's)")
    ap.add_argument("--eval-samples", type=int, default=None, help="evaluation items (default: the demo's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--start-strength", type=float, default=None,
                    help="where the curriculum arms (c, j) start (default: the model's curriculum_start)")
    ap.add_argument("--lr", type=float, default=None,
                    help="DDPO learning rate of the arms that train the ControlNet, f, i and j (default: the demo's)")
    ap.add_argument("--arms", default="a,b,c,d,e,g", help="which arms to run (comma-separated letters: a-j)")
    args = ap.parse_args(argv)

    import torch

    from rl.files import atomic_write_json, atomic_write_text
    from rl.toy.demo import DemoConfig, demo_trainer, run_demo
    from rl.toy.model import ToyModel, measure

    if args.threads:
        torch.set_num_threads(args.threads)
    demo_defaults = DemoConfig(out=".")
    for name in ("rounds", "groups", "group_size", "eval_samples"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(demo_defaults, name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ToyModel.load()
    scorer = model.clip_scorer()
    arms = set(args.arms.split(","))
    budget = args.rounds * args.groups * args.group_size
    n_best = max(1, round(budget / args.eval_samples))
    results: dict[str, list[dict[str, float]]] = {}
    times: dict[str, list[float]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        eval_seeds = list(range(50_000 + 1000 * seed, 50_000 + 1000 * seed + args.eval_samples))
        runs = []
        if "a" in arms:
            runs.append(("(a) pretrained", lambda es=eval_seeds: measure(model, model.demo_strength, es, scorer=scorer)))
        if "g" in arms:
            runs.append(("(g) module feedback + luma control, not learned", lambda es=eval_seeds: measure(
                model, model.demo_strength, es, scorer=scorer, feedback=DemoConfig(out=".").feedback(),
                luma_control=True)))
        for key, name, curriculum, train_cn, feedback in (
                ("b", "(b) RL, no curriculum", "none", False, True),
                ("c", "(c) RL + curriculum", "linear", False, True),
                ("h", "(h) RL, curve only (no module feedback)", "none", False, False),
                ("f", "(f) RL, curve + ControlNet DDPO", "none", True, False),
                ("i", "(i) RL + ControlNet DDPO, no curriculum", "none", True, True),
                ("j", "(j) RL + ControlNet DDPO + curriculum", "linear", True, True)):
            if key in arms:
                def rl_run(curriculum=curriculum, key=key, seed=seed, train_cn=train_cn, feedback=feedback):
                    # the DDPO arms as they were measured: zero convs, std step weights, rounds sampled
                    # with the ControlNet trained so far
                    trainer = (({"objective": "ddpo", "mode": "zero_convs", "lr": 2e-4, "step_weighting": "std"}
                                if train_cn else {}) | ({"lr": args.lr} if args.lr is not None else {}))
                    cfg = DemoConfig(out=out / f"{key}-seed{seed}", rounds=args.rounds, groups=args.groups,
                                     group_size=args.group_size, eval_samples=args.eval_samples, seed=seed,
                                     curriculum=curriculum, train_controlnet=train_cn, module_feedback=feedback,
                                     progress=False, keep_shards=False, train=demo_trainer(**trainer),
                                     **({"teacher": "current"} if train_cn else {}),
                                     **({"start_strength": args.start_strength}
                                        if args.start_strength is not None and curriculum != "none" else {}))
                    summary = run_demo(cfg, log=lambda m: None).summary
                    return summary["tricks"]["after"] | {"strength": summary["after_mean_strength"]}
                runs.append((name, rl_run))
        if "e" in arms:
            for step in (0.1, 0.2):
                s = round(model.demo_strength + step, 2)
                runs.append((f"(e) pretrained at {s}", lambda es=eval_seeds, s=s: measure(model, s, es, scorer=scorer)))
        if "d" in arms:
            runs.append((f"(d) best-of-{n_best}", lambda seed=seed: best_of_n(model, n_best, args.eval_samples, seed, scorer)
                         | {"strength": model.demo_strength}))
        for name, fn in runs:
            t0 = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t0
            row = {k: float(res[k]) for k in ("decode_rate", "module_accuracy", "art_similarity")}
            row["mean_strength"] = float(np.mean(res["strength"]))
            results.setdefault(name, []).append(row)
            times.setdefault(name, []).append(dt)
            print(f"seed {seed} {name}: decode {row['decode_rate']:.2f} module acc {row['module_accuracy']:.3f} "
                  f"art {row['art_similarity']:.3f} ({dt:.0f} s)", file=sys.stderr, flush=True)
    lines = [f"Toy model, demo strength {model.demo_strength}, {args.eval_samples} evaluation items, "
             f"{args.seeds} seeds (mean ± std); RL budget {budget} samples ({args.rounds} rounds × "
             f"{args.groups * args.group_size}).", "",
             "| arm | decode rate | module accuracy | art similarity | mean strength | wall time / seed |",
             "|---|---|---|---|---|---|"]
    table = {}
    for name, rows in results.items():
        cells = {k: _stats([r[k] for r in rows]) for k in ("decode_rate", "module_accuracy", "art_similarity", "mean_strength")}
        table[name] = {k: {"mean": m, "std": s} for k, (m, s) in cells.items()} | {"seconds": float(np.mean(times[name]))}
        lines.append(f"| {name} | {cells['decode_rate'][0]:.0%} ± {cells['decode_rate'][1]:.0%} | "
                     f"{cells['module_accuracy'][0]:.3f} ± {cells['module_accuracy'][1]:.3f} | "
                     f"{cells['art_similarity'][0]:.3f} ± {cells['art_similarity'][1]:.3f} | "
                     f"{cells['mean_strength'][0]:.2f} | "
                     f"{np.mean(times[name]):.0f} s |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "learning.md", text)
    atomic_write_json(out / "learning.json", {"args": vars(args), "table": table, "runs": results})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
