"""Decode-vs-art frontiers on the toy: does the tuned ControlNet beat the simple baselines at equal art?

Every arm is evaluated on the same ``--items`` fixed evaluation items (prompt, payload, seed), so
the comparisons are paired per item. Art is judged twice: by the CLIP similarity to the base image
that the rewards use, and by a held-out structure judge that nothing trains on
(``rl.art_judge.structure_similarity``). The art budget is 95% of the pretrained ControlNet's art at
the demo strength on the same items, for each judge.

Arms (each a frontier: a sweep of the ControlNet strength):
  dial            the pretrained ControlNet in a plain sampler;
  best-of-N       the pretrained ControlNet at the demo strength, N draws per item, keep the draw
                  with the best scan score (N = 2, 4, 8; art against that draw's own base image);
  tricks          the pretrained ControlNet with module feedback + luma-only control, untrained:
                  at the budget it is "the untrained sampler at the setting that spends the budget";
  tuned-plain     the ControlNet ``qr-rl demo`` trained (rwr), loaded into a plain sampler: what
                  anyone gets from the exported file; one per training seed and recipe;
  feedback, luma  each of the two tricks alone, untrained (``--single-tricks``), and the tricks with luma
                  control through a latent→RGB preview table, the projection the ComfyUI node uses;
  tuned-tricks    the same tuned file with module feedback + luma-only control;
  guided          scan guidance (rl.scan_guidance, the last step) on the untrained sampler: alone in a
                  plain sampler, and on top of the tricks;
  recipes: ``curriculum`` (0.8 → 0.5), ``flat`` (every round at 0.5) and ``guided`` (the curriculum, with
  scan guidance in the rounds' sampler: the teacher rwr distils), each with rwr at the round's base
  strength; ``flat-recorded`` (the demo's default: every round at 0.5, rwr at each step's recorded
  strength). The cached results of the first three were trained on every step at lr 1e-4, the demo's
  trainer setting of the day; the demo now trains half the steps at lr 2e-4 (the same student at seed 0).

The headline per arm is the decode rate at the art budget, interpolated on its frontier, with a
95% bootstrap interval over items (and seeds); differences between arms are paired per item.

Run it in parts (each caches its per-item results under ``--out``), then ``--report``:

    python bench/frontiers.py --out bench-out/frontiers --part baselines
    python bench/frontiers.py --out bench-out/frontiers --part train --seed 0 --recipe curriculum
    python bench/frontiers.py --out bench-out/frontiers --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIAL = (0.4, 0.5, 0.6, 0.7)
TRICKS = (0.3, 0.4, 0.5, 0.6)
LUMA = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # luma-only control alone keeps more art per strength: it crosses the budget later
TUNED_PLAIN = (0.4, 0.5, 0.6)
#: a file trained at the recorded strength spends less art per strength: its sweep goes one step further
TUNED_PLAIN_OF = {"flat-recorded": (0.4, 0.5, 0.6, 0.7)}
TUNED_TRICKS = (0.3, 0.4, 0.5)
GUIDED_PLAIN = (0.2, 0.3, 0.4, 0.5)
GUIDED_TRICKS = (0.1, 0.2, 0.3, 0.4)
RECIPES = ("curriculum", "flat", "guided", "flat-recorded")
BEST_OF = (2, 4)
EVAL_SEED0 = 70_000


def _items(n: int):
    from rl.toy.model import eval_prompts_codes

    prompts, codes, _ = eval_prompts_codes(n)
    return prompts, codes, list(range(EVAL_SEED0, EVAL_SEED0 + n))


def evaluate(model, scorer, strength, n: int, controlnet=None, tricks: bool = False, seed_shift: int = 0,
             batch: int = 64, guided: bool = False, feedback: bool | None = None,
             luma: bool | None = None) -> dict[str, list[float]]:
    """Per-item decoded (0/1), scan score, CLIP art and held-out art at ``strength``. ``tricks`` turns
    on module feedback and luma-only control together; ``feedback`` / ``luma`` override one of them."""
    import torch

    from rl.art_judge import structure_similarity
    from rl.scan import scan_reward
    from rl.toy.demo import DemoConfig
    from rl.toy.model import images_hwc_uint8, sample

    prompts, codes, seeds = _items(n)
    seeds = [s + seed_shift for s in seeds]
    feedback = tricks if feedback is None else feedback
    luma = tricks if luma is None else luma
    fb = DemoConfig(out=".").feedback() if feedback else None
    guidance = DemoConfig(out=".", scan_guidance=True).guidance() if guided else None
    out: dict[str, list[float]] = {"decoded": [], "scan": [], "art": [], "art_heldout": []}
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        imgs = sample(model, prompts[sl], codes[sl], seeds[sl], strength, controlnet=controlnet, record=False,
                      feedback=fb, luma_control=luma, guidance=guidance).images
        base = sample(model, prompts[sl], None, seeds[sl], 0.0, record=False).images
        scan = scan_reward(images_hwc_uint8(imgs), codes[sl])
        art = model.art_reward(imgs, prompts[sl], base, scorer).components["clip_image"]
        out["decoded"] += [float(v) for v in scan.components["decoded"]]
        out["scan"] += [float(v) for v in scan.total]
        out["art"] += [float(v) for v in art]
        out["art_heldout"] += [float(v) for v in structure_similarity(imgs, base)]
        del imgs, base
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def preview_factors(fold: int) -> list[list[float]]:
    """A latent→RGB preview table ``[C,3]`` for the toy's folded latent: each ``fold × fold`` block's
    mean colour, the linear kind of map ComfyUI previews an SD latent with."""
    return [[1.0 / fold**2 if c == k // fold**2 else 0.0 for c in range(3)] for k in range(3 * fold**2)]


class PreviewLumaPath:
    """While active, the toy's luma-only control goes through :func:`rl.luma_control.latent_luma_projection`
    over :func:`preview_factors` (the projection the ComfyUI node builds from a model's preview colours)
    instead of the exact folded projection. Why: it shows whether the node's approximate path keeps
    the gain the toy measured with the exact one."""

    def __enter__(self):
        import rl.luma_control as lc

        self._saved = lc.folded_luma_projection
        lc.folded_luma_projection = lambda fold: lc.latent_luma_projection(preview_factors(fold))
        return self

    def __exit__(self, *exc):
        import rl.luma_control as lc

        lc.folded_luma_projection = self._saved


def _save(path: Path, data) -> None:
    from rl.files import atomic_write_json

    atomic_write_json(path, data)


def part_baselines(args, model, scorer) -> None:
    out = Path(args.out) / "baselines.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    for s in DIAL:
        key = f"dial@{s}"
        if key not in res:
            t0 = time.perf_counter()
            res[key] = evaluate(model, scorer, s, args.items) | {"strength": s, "seconds": time.perf_counter() - t0}
            _save(out, res)
            print(f"{key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}", flush=True)
    for name, strengths, tricks in (("guided", GUIDED_PLAIN, False), ("guided-tricks", GUIDED_TRICKS, True)):
        for s in strengths:
            key = f"{name}@{s}"
            if key not in res:
                t0 = time.perf_counter()
                res[key] = evaluate(model, scorer, s, args.items, tricks=tricks, guided=True) | {
                    "strength": s, "seconds": time.perf_counter() - t0}
                _save(out, res)
                print(f"{key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}", flush=True)
    for s in TRICKS:
        key = f"tricks@{s}"
        if key not in res:
            t0 = time.perf_counter()
            res[key] = evaluate(model, scorer, s, args.items, tricks=True) | {"strength": s,
                                                                              "seconds": time.perf_counter() - t0}
            _save(out, res)
            print(f"{key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}", flush=True)
    if args.single_tricks:  # each trick alone (issue 21: luma-only control next to module feedback)
        from contextlib import nullcontext

        for name, only, path, sweep in (("feedback", {"feedback": True, "luma": False}, nullcontext, TRICKS),
                                        ("luma", {"feedback": False, "luma": True}, nullcontext, LUMA),
                                        ("tricks-preview", {"tricks": True}, PreviewLumaPath, TRICKS)):
            for s in sweep:
                key = f"{name}@{s}"
                if key not in res:
                    t0 = time.perf_counter()
                    with path():
                        res[key] = evaluate(model, scorer, s, args.items, **only) | {
                            "strength": s, "seconds": time.perf_counter() - t0}
                    _save(out, res)
                    print(f"{key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}",
                          flush=True)
    for j in range(1, max(BEST_OF)):
        key = f"draw{j}@{model.demo_strength}"
        if key not in res:
            res[key] = evaluate(model, scorer, model.demo_strength, args.items, seed_shift=7_919 * j)
            _save(out, res)
            print(f"{key} done", flush=True)


def part_train(args, model, scorer) -> None:
    from rl.toy.demo import DemoConfig, run_demo
    from rl.weights import load_controlnet

    name = f"{args.recipe}-seed{args.seed}"
    out = Path(args.out) / f"tuned-{name}.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    run_dir = Path(args.from_run) if args.from_run else Path(args.out) / "runs" / name
    if "summary" not in res and args.from_run:  # a finished `qr-rl demo` run with these settings
        summary = json.loads((run_dir / "summary.json").read_text())
        conf = summary.get("config", {})
        want = {"seed": args.seed, "curriculum": "none" if args.recipe.startswith("flat") else "linear",
                "scan_guidance": args.recipe == "guided",
                "rwr_strength": "recorded" if args.recipe == "flat-recorded" else "base"}
        got = {k: conf.get(k, "base" if k == "rwr_strength" else None) for k in want}
        if got != want:
            raise SystemExit(f"--from-run {run_dir}: its settings {got} are not recipe {args.recipe!r} at seed "
                             f"{args.seed} ({want})")
        res["summary"] = {k: summary[k] for k in ("plain", "tricks", "schedule", "wall_time_s")} | {"from_run": str(run_dir)}
        _save(out, res)
    if "summary" not in res:
        t0 = time.perf_counter()
        cfg = DemoConfig(out=run_dir, seed=args.seed, curriculum="none" if args.recipe.startswith("flat") else "linear",
                         scan_guidance=args.recipe == "guided", eval_samples=16, progress=False, keep_shards=False,
                         rwr_strength="recorded" if args.recipe == "flat-recorded" else "base")
        summary = run_demo(cfg, log=lambda m: print(f"  {name}: {m}", flush=True)).summary
        res["summary"] = {k: summary[k] for k in ("plain", "tricks", "schedule", "wall_time_s")}
        res["train_seconds"] = time.perf_counter() - t0
        _save(out, res)
    cn = load_controlnet(run_dir / "controlnet.safetensors", model.controlnet_config_path).requires_grad_(False)
    for s in TUNED_PLAIN_OF.get(args.recipe, TUNED_PLAIN):
        key = f"plain@{s}"
        if key not in res:
            res[key] = evaluate(model, scorer, s, args.items, controlnet=cn) | {"strength": s}
            _save(out, res)
            print(f"{name} {key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}", flush=True)
    for s in TUNED_TRICKS:
        key = f"tricks@{s}"
        if key not in res:
            res[key] = evaluate(model, scorer, s, args.items, controlnet=cn, tricks=True) | {"strength": s}
            _save(out, res)
            print(f"{name} {key}: decode {np.mean(res[key]['decoded']):.3f} art {np.mean(res[key]['art']):.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# report


def at_budget(points: list[dict], judge: str, budget: float, idx: np.ndarray | None = None) -> float:
    """The best decode rate on the frontier (points joined in strength order, linearly) whose art on
    ``judge`` is at least ``budget``; NaN when no point or segment reaches it (no extrapolation).

    Why the best and not the first crossing: with scan guidance art is not monotone in strength (at a
    low strength guidance has more modules to fix), so a sweep can cross the budget more than once."""
    xs, ys = [], []
    for p in sorted(points, key=lambda p: p["strength"]):
        a, d = np.asarray(p[judge]), np.asarray(p["decoded"])
        if idx is not None:
            a, d = a[idx], d[idx]
        xs.append(a.mean())
        ys.append(d.mean())
    best = float("nan")
    for i in range(len(xs)):
        if xs[i] >= budget:
            best = ys[i] if not np.isfinite(best) else max(best, ys[i])
        if i + 1 < len(xs) and (xs[i] - budget) * (xs[i + 1] - budget) < 0:
            t = (budget - xs[i]) / (xs[i + 1] - xs[i])
            v = ys[i] + t * (ys[i + 1] - ys[i])
            best = v if not np.isfinite(best) else max(best, v)
    return float(best)


def best_of(base: dict, draws: list[dict], n: int) -> dict:
    """Per item, among the first n draws, the one with the best scan score."""
    pool = [base] + draws[: n - 1]
    scan = np.stack([np.asarray(d["scan"]) for d in pool])
    pick = scan.argmax(0)
    return {k: np.stack([np.asarray(d[k]) for d in pool])[pick, np.arange(scan.shape[1])].tolist()
            for k in ("decoded", "scan", "art", "art_heldout")}


def report(args, model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rl.files import atomic_write_text

    root = Path(args.out)
    base = json.loads((root / "baselines.json").read_text())
    demo = model.demo_strength
    ref = base[f"dial@{demo}"]
    budgets = {j: 0.95 * float(np.mean(ref[j])) for j in ("art", "art_heldout")}
    arms: dict[str, list[list[dict]]] = {}  # arm -> one frontier per seed
    arms["dial (pretrained, plain)"] = [[base[f"dial@{s}"] for s in DIAL]]
    arms["tricks, untrained"] = [[base[f"tricks@{s}"] for s in TRICKS]]
    for name, label, sweep in (("feedback", "module feedback alone, untrained", TRICKS),
                               ("luma", "luma-only control alone, untrained", LUMA),
                               ("tricks-preview", "tricks, luma through a preview table (the node's projection), untrained",
                                TRICKS)):
        if all(f"{name}@{s}" in base for s in sweep):
            arms[label] = [[base[f"{name}@{s}"] for s in sweep]]
    if all(f"guided@{s}" in base for s in GUIDED_PLAIN):
        arms["scan guidance, untrained"] = [[base[f"guided@{s}"] for s in GUIDED_PLAIN]]
    if all(f"guided-tricks@{s}" in base for s in GUIDED_TRICKS):
        arms["tricks + scan guidance, untrained"] = [[base[f"guided-tricks@{s}"] for s in GUIDED_TRICKS]]
    draws = [base[f"draw{j}@{demo}"] for j in range(1, max(BEST_OF)) if f"draw{j}@{demo}" in base]
    singles: dict[str, dict] = {}
    seeds_of: dict[str, list[int]] = {}  # trained arms: the training seed of each frontier
    for n in BEST_OF:
        if len(draws) >= n - 1:
            singles[f"best-of-{n} (pretrained, {demo})"] = best_of(ref, draws, n)
    for recipe in RECIPES:
        files = sorted(root.glob(f"tuned-{recipe}-seed*.json"), key=lambda f: int(f.stem.rsplit("seed", 1)[1]))
        runs = [(int(f.stem.rsplit("seed", 1)[1]), json.loads(f.read_text())) for f in files]
        sweep = TUNED_PLAIN_OF.get(recipe, TUNED_PLAIN)
        plain = [(seed, r) for seed, r in runs if all(f"plain@{s}" in r for s in sweep)]
        if plain:
            arms[f"tuned ({recipe}), plain"] = [[r[f"plain@{s}"] for s in sweep] for _, r in plain]
            seeds_of[f"tuned ({recipe}), plain"] = [seed for seed, _ in plain]
        with_tricks = [(seed, r) for seed, r in runs if all(f"tricks@{s}" in r for s in TUNED_TRICKS)]
        if with_tricks:
            arms[f"tuned ({recipe}) + tricks"] = [[r[f"tricks@{s}"] for s in TUNED_TRICKS] for _, r in with_tricks]
            seeds_of[f"tuned ({recipe}) + tricks"] = [seed for seed, _ in with_tricks]
    n_items = len(ref["decoded"])
    rng = np.random.default_rng(0)
    boots = [rng.integers(0, n_items, n_items) for _ in range(args.bootstrap)]

    def headline(frontiers: list[list[dict]], judge: str, idx=None) -> float:
        # every seed must reach the budget: a mean over the seeds that do would flatter the arm
        return float(np.mean([at_budget(f, judge, budgets[judge], idx) for f in frontiers]))

    rows, table = [], {}
    dial = arms["dial (pretrained, plain)"]
    tricks = arms["tricks, untrained"]
    for name, frontiers in arms.items():
        cell = {}
        for judge in ("art", "art_heldout"):
            v = headline(frontiers, judge)
            bs = np.array([headline(frontiers, judge, b) for b in boots])
            d_dial = np.array([headline(frontiers, judge, b) - headline(dial, judge, b) for b in boots])
            d_tricks = np.array([headline(frontiers, judge, b) - headline(tricks, judge, b) for b in boots])
            cell[judge] = {"decode_at_budget": v, "ci": np.nanpercentile(bs, [2.5, 97.5]).tolist(),
                           "vs_dial": [float(np.nanmean(d_dial)), *np.nanpercentile(d_dial, [2.5, 97.5]).tolist()],
                           "vs_tricks": [float(np.nanmean(d_tricks)), *np.nanpercentile(d_tricks, [2.5, 97.5]).tolist()]}
        table[name] = cell | {"seeds": len(frontiers)}
        rows.append(name)
    lines = [f"Toy model, {n_items} evaluation items (paired across arms), art budget = 95% of the pretrained "
             f"ControlNet's art at {demo}: CLIP {budgets['art']:.3f}, held-out SSIM {budgets['art_heldout']:.3f}. "
             "Decode rate at the budget, interpolated on each arm's strength sweep (mean over seeds), 95% bootstrap "
             "intervals over items; differences paired per item.", "",
             "| arm | seeds | decode @ CLIP budget [95% CI] | vs dial | vs untrained tricks | decode @ SSIM budget [95% CI] | vs dial |",
             "|---|---|---|---|---|---|---|"]

    def pct(v: float) -> str:
        return "n/a" if not np.isfinite(v) else f"{v:.0%}"

    def cell(j: dict, versus: str | None) -> str:
        """Headline [CI] (or the paired difference against ``versus``); n/a where the sweep never
        reaches the budget on all items (a bootstrap resample may, which is not a result)."""
        if not np.isfinite(j["decode_at_budget"]):
            return "n/a"
        if versus is None:
            return f"{pct(j['decode_at_budget'])} [{pct(j['ci'][0])}, {pct(j['ci'][1])}]"
        d = j[versus]
        return f"{d[0]:+.0%} [{d[1]:+.0%}, {d[2]:+.0%}]"

    for name in rows:
        c, h = table[name]["art"], table[name]["art_heldout"]
        lines.append(f"| {name} | {table[name]['seeds']} | {cell(c, None)} | {cell(c, 'vs_dial')} | "
                     f"{cell(c, 'vs_tricks')} | {cell(h, None)} | {cell(h, 'vs_dial')} |")
    per_seed = [f"- {name}: " + "; ".join(
        f"seed {seed}: {pct(at_budget(f, 'art', budgets['art']))} / {pct(at_budget(f, 'art_heldout', budgets['art_heldout']))}"
        for seed, f in zip(seeds_of[name], arms[name])) for name in rows if name in seeds_of]
    if per_seed:
        lines += ["", "Trained arms per training seed: decode at the CLIP budget / at the SSIM budget", "", *per_seed]
    # the recipes against the demo's default (the curriculum), paired per item
    versus = []
    for recipe in RECIPES[1:]:
        for kind in ("plain", "+ tricks"):
            mine, ref_arm = f"tuned ({recipe}){' ' if kind == '+ tricks' else ', '}{kind}", \
                f"tuned (curriculum){' ' if kind == '+ tricks' else ', '}{kind}"
            if mine not in arms or ref_arm not in arms:
                continue
            cells = []
            for judge in ("art", "art_heldout"):
                d = np.array([headline(arms[mine], judge, b) - headline(arms[ref_arm], judge, b) for b in boots])
                ok = np.isfinite(headline(arms[mine], judge)) and np.isfinite(headline(arms[ref_arm], judge))
                cells.append(f"{np.nanmean(d):+.0%} [{np.nanpercentile(d, 2.5):+.0%}, {np.nanpercentile(d, 97.5):+.0%}]"
                             if ok else "n/a")
                table[mine][judge]["vs_curriculum"] = [float(np.nanmean(d)), *np.nanpercentile(d, [2.5, 97.5]).tolist()]
            versus.append(f"- {mine} vs {ref_arm}: {cells[0]} at the CLIP budget, {cells[1]} at the SSIM budget")
    if versus:
        lines += ["", "Recipes against the curriculum recipe (paired per item):", "", *versus]
    lines += ["", "Single points (not frontiers): best-of-N at the demo strength; its art is each draw against its own "
              "base image, so it spends no strength; samples and scans per delivered image = N.", "",
              "| arm | decode | CLIP art | SSIM art |", "|---|---|---|---|"]
    for name, d in singles.items():
        lines.append(f"| {name} | {np.mean(d['decoded']):.0%} | {np.mean(d['art']):.3f} | {np.mean(d['art_heldout']):.3f} |")
    lines += ["", "Frontier points (mean over seeds): strength → decode / CLIP art / SSIM art", ""]
    for name, frontiers in arms.items():
        pts = []
        for i, p in enumerate(frontiers[0]):
            dec = np.mean([np.mean(f[i]["decoded"]) for f in frontiers])
            art = np.mean([np.mean(f[i]["art"]) for f in frontiers])
            ssim = np.mean([np.mean(f[i]["art_heldout"]) for f in frontiers])
            pts.append(f"{p['strength']}: {dec:.0%} / {art:.3f} / {ssim:.3f}")
        lines.append(f"- {name}: " + "; ".join(pts))
    text = "\n".join(lines) + "\n"
    atomic_write_text(root / "frontiers.md", text)
    from rl.files import atomic_write_json

    atomic_write_json(root / "frontiers.json", {"budgets": budgets, "table": table})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colours = plt.get_cmap("tab20").colors  # one colour per arm: the default cycle repeats after 10
    for ax, judge, label in ((axes[0], "art", "art: CLIP similarity (trained on)"),
                             (axes[1], "art_heldout", "art: SSIM structure (held out)")):
        for k, (name, frontiers) in enumerate(arms.items()):
            xs = [np.mean([np.mean(f[i][judge]) for f in frontiers]) for i in range(len(frontiers[0]))]
            ys = [np.mean([np.mean(f[i]["decoded"]) for f in frontiers]) for i in range(len(frontiers[0]))]
            trained = name.startswith("tuned")
            ax.plot(xs, ys, marker="o", ms=3, color=colours[k % len(colours)], ls="--" if trained else "-",
                    lw=2.5 if name == f"tuned ({RECIPES[-1]}), plain" else 1.2, label=name)
        for name, d in singles.items():
            ax.scatter([np.mean(d[judge])], [np.mean(d["decoded"])], marker="x", label=name)
        ax.axvline(budgets[judge], color="red", ls=":", lw=1, label="art budget")
        ax.set_xlabel(label)
        ax.set_ylabel("decode rate")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    from rl.image_io import save_figure

    save_figure(fig, root / "frontiers.png")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/frontiers")
    ap.add_argument("--part", choices=("baselines", "train"), default=None)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", choices=RECIPES, default="curriculum")
    ap.add_argument("--from-run", default=None,
                    help="--part train: evaluate the controlnet.safetensors of a finished `qr-rl demo` run (its seed "
                         "and curriculum must match --seed and --recipe) instead of training")
    ap.add_argument("--single-tricks", action="store_true",
                    help="--part baselines: also sweep module feedback alone and luma-only control alone")
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from rl.toy.model import ToyModel

    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = ToyModel.load()
    if args.part == "baselines":
        part_baselines(args, model, model.clip_scorer())
    elif args.part == "train":
        part_train(args, model, model.clip_scorer())
    if args.report:
        report(args, model)


if __name__ == "__main__":
    main()
