"""Does ``qr-rl loop`` learn as the demo does? The demo's recipe through the loop, on the toy backend.

The loop (rl/loop.py: resumable phases, the toy backend standing in for ComfyUI) runs the recipe of
``configs/loop.toml``: every round samples with the pretrained ControlNet plus module feedback and
luma-only control (a fixed teacher), the strength curve is learned per sample, and rwr distils the
tricks' predictions into the ControlNet that trains on from round to round. Unlike the demo, the loop
has no art budget (the curve's level is learned from scan + art alone) and no held rounds at the end
of its curriculum. Then the pretrained and the final ControlNet are evaluated in a plain sampler at
the demo strength on the demo's evaluation items (both art judges), next to the dial.

    python bench/loop_recipe.py --out bench-out/loop-recipe           # ≈ 15 min on one thread
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def evaluate(model, scorer, controlnet, strength: float, n: int, base) -> dict[str, float]:
    from rl.art_judge import structure_similarity
    from rl.toy.model import measure

    seeds = list(range(50_000, 50_000 + n))  # the demo's evaluation items at seed 0
    m = measure(model, strength, seeds, controlnet=controlnet, scorer=scorer, base_images=base)
    return {"decode_rate": m["decode_rate"], "art_similarity": m["art_similarity"],
            "art_heldout": float(structure_similarity(m["images"], m["base_images"]).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/loop-recipe")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dial", default="0.5,0.6", help="pretrained strengths evaluated next to the tuned file")
    ap.add_argument("--no-learn-schedule", dest="learn_schedule", action="store_false",
                    help="every sample at the round's base strength (no learned curve)")
    args = ap.parse_args()

    import torch

    from rl.loop import LoopConfig, loop_trainer, run_loop
    from rl.toy import world
    from rl.toy.model import DEMO_PAYLOADS, ToyModel, eval_prompts_codes, sample
    from rl.weights import load_controlnet

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ToyModel.load(None)
    specs = world.all_specs()
    prompts = [specs[i * len(specs) // 4].prompt for i in range(4)]
    cfg = LoopConfig(backend="local", run_dir=str(out / "run"), name="recipe", rounds=args.rounds, curriculum="linear",
                     start_strength=model.curriculum_start, end_strength=model.demo_strength, prompts=prompts,
                     payloads=list(DEMO_PAYLOADS[:2]), seeds=8, batch=8, learn_schedule=args.learn_schedule, teacher="pretrained",
                     module_feedback=True, luma_control=True, threads=args.threads, progress=False,
                     train=loop_trainer(objective="rwr", mode="full", lr=2e-4, epochs=1, batch_size=16,
                                        timestep_fraction=0.5, cpu=True, export_dtype="fp32"))
    t0 = time.perf_counter()
    res = run_loop(cfg, log=lambda m: print(f"loop: {m}", flush=True))
    loop_s = time.perf_counter() - t0

    scorer = model.clip_scorer()
    eval_prompts, _, _ = eval_prompts_codes(args.eval)
    base = sample(model, eval_prompts, None, list(range(50_000, 50_000 + args.eval)), 0.0, record=False).images
    low = float(model.demo_strength)
    rows = {f"pretrained, plain @ {s}": evaluate(model, scorer, None, float(s), args.eval, base)
            for s in args.dial.split(",")}
    tuned = load_controlnet(res.rounds[-1]["exported"], model.controlnet_config_path).requires_grad_(False)
    rows[f"loop-tuned, plain @ {low}"] = evaluate(model, scorer, tuned, low, args.eval, base)
    report = {"learn_schedule": args.learn_schedule, "rounds": [{k: r.get(k) for k in ("round", "strength", "metrics", "schedule")} for r in res.rounds],
              "loop_seconds": round(loop_s, 1), "threads": args.threads, "eval_items": args.eval, "plain": rows}
    (out / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nloop: {args.rounds} rounds in {loop_s / 60:.1f} min on {args.threads} thread(s)")
    print("| ControlNet in a plain sampler | decode | art (CLIP) | art (SSIM, held out) |\n|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['decode_rate']:.0%} | {m['art_similarity']:.3f} | {m['art_heldout']:.3f} |")


if __name__ == "__main__":
    main()
