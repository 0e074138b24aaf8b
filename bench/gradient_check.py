"""Is the update signal? Cosine between the gradients of two disjoint halves of a batch, per objective.

Before a learning run is worth hours, two halves of the same round should push the weights the
same way. This samples rounds the way ``qr-rl demo`` collects them (the toy model at its demo
strength, module feedback and luma-only control, reward = scan + 0.5 × art), writes the shards,
and for each objective of ``qr-rl train`` and each half size takes the gradient at the starting
weights (``rl.train.objective_gradients``) on ``--pairs`` random disjoint pairs of halves.
A mean cosine >= 0.3 passes. About 6 minutes on 2 busy cores (105 s of it collecting the shards,
which a second run reuses).

    python bench/gradient_check.py --out bench-out/gradient-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/gradient-check")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of 64 samples to draw halves from (default 2)")
    ap.add_argument("--sizes", default="8,16,32", help="half sizes in samples (default 8,16,32)")
    ap.add_argument("--pairs", type=int, default=2, help="disjoint pairs of halves per size (default 2)")
    ap.add_argument("--mode", default="zero_convs", help="which ControlNet weights the gradient is over")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from rl.files import sha256_file as file_sha256
    from rl.toy import world
    from rl.toy.demo import DemoConfig, collect_round
    from rl.toy.model import ToyModel
    from rl.train import TrainConfig, objective_gradients

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ToyModel.load()
    cfg = DemoConfig(out=out, learn_schedule=False, train_controlnet=True, mirrored=False)
    scorer, sha = model.clip_scorer(), file_sha256(model.unet_path)
    t0 = time.perf_counter()
    shards = out / "shards"
    if not shards.exists():
        for r in range(args.rounds):
            collect_round(model, None, model.controlnet_path, model.demo_strength, r, cfg, shards / f"r{r}", scorer, sha)
    n = 64 * args.rounds
    print(f"{n} samples collected in {time.perf_counter() - t0:.0f} s ({world.LATENT_SIZE}² toy latents)")
    sizes = [int(s) for s in args.sizes.split(",") if 0 < int(s) <= n // 2]
    rng = np.random.default_rng(0)
    rows = []
    for objective in ("ddpo", "rwr"):
        tc = TrainConfig(trajectories=[str(shards)], checkpoint=model.unet_path, controlnet=model.controlnet_path,
                         out=out / "unused.safetensors", unet_config=model.unet_config_path,
                         controlnet_config=model.controlnet_config_path, mode=args.mode, objective=objective,
                         target_strength=model.demo_strength if objective == "rwr" else None, batch_size=32,
                         min_group_size=cfg.group_size, cpu=True, progress=False)
        subsets = []
        for size in sizes:
            for _ in range(args.pairs):
                perm = rng.permutation(n)
                subsets += [perm[:size].tolist(), perm[size:2 * size].tolist()]
        t1 = time.perf_counter()
        grads = objective_gradients(tc, subsets)
        for i, size in enumerate(sizes):
            cos = []
            for j in range(args.pairs):
                a, b = grads[2 * (i * args.pairs + j)], grads[2 * (i * args.pairs + j) + 1]
                cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            rows.append({"objective": objective, "half": size, "cosine_mean": float(np.mean(cos)),
                         "cosine_min": float(np.min(cos)), "passes": bool(np.mean(cos) >= 0.3)})
        print(f"{objective}: {len(subsets)} gradients in {time.perf_counter() - t1:.0f} s")
    lines = ["| objective | half batch (samples) | cosine, mean | cosine, min | passes (≥ 0.3) |", "|---|---|---|---|---|"]
    lines += [f"| {r['objective']} | {r['half']} | {r['cosine_mean']:.3f} | {r['cosine_min']:.3f} | "
              f"{'yes' if r['passes'] else 'no'} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (out / "gradient_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "gradient_check.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
