"""Which decode-rate / art-similarity trade-offs does the toy world admit at all?

The learning benchmark asks RL to reach ≥ 80% decode with art similarity within 5% of the
pretrained ControlNet. This diagnostic measures whether *any* image in reach does that, by
editing the model's own base art (its no-ControlNet sample, what the art reward compares
against) directly in pixel space:

  controlnet   the shipped ControlNet at a range of strengths (what RL starts from);
  one step     strength 0.4 (the earlier demo strength) at every step but one, which gets more: where in the denoising
               the strength buys decode (the lever the learned strength curve finds);
  overlay w    ``(1 - w)·art + w·code`` in black and white (what the ControlNet was taught);
  palette w    the same, with the code painted in the art's own lightest / darkest colours
               (how QR art hides a code);
  curve        hand-made per-step strength curves around the demo strength (what the learned
               curve can reach);
  minimal d    the smallest edit that puts every pixel on its module's side of the art's
               median luminance by a margin ``d`` (pixels already on the right side are left
               alone; wrong ones are moved toward the painted code just far enough) -- the
               best a policy that knew the art and the code pixel by pixel could do;
  rendered w   the black-and-white overlay on the *procedural* art the toy world renders,
               which the toy CLIP recognises (its prompt similarity is printed).

Art similarity is ``clip_image`` against the base art and prompt similarity ``clip_text``,
both through ``ToyModel.art_reward`` as in the demo. Prints a markdown table; ≈ 4 min.

    python bench/frontier.py [--n 64] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np

# hand-made per-step curves (10 steps) around the demo strength 0.5: what a learned curve can reach
CURVES = (
    (0.2,) * 6 + (0.4, 0.8, 1.2, 0.5),
    (0.3,) * 6 + (0.4, 0.8, 1.2, 0.2),
    (0.3,) * 7 + (0.8, 1.2, 0.5),
    (0.4,) * 7 + (0.8, 1.2, 0.5),
    (0.5,) * 7 + (1.2, 1.2, 0.5),
    (0.0,) * 6 + (0.4, 0.8, 1.2, 0.5),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="evaluation items (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    from rl.scan import scan_reward
    from rl.toy import world
    from rl.toy.model import ToyModel, eval_prompts_codes, images_hwc_uint8, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ToyModel.load()
    scorer = model.clip_scorer()
    prompts, codes, _ = eval_prompts_codes(args.n)
    seeds = list(range(20_000, 20_000 + args.n))
    art = sample(model, prompts, None, seeds, 0.0, record=False).images
    code = torch.stack([world.code_image(c, world.IMAGE_SIZE) for c in codes])
    rendered = torch.stack([torch.from_numpy(world.render_base(world.parse_prompt(p), s))
                            for p, s in zip(prompts, seeds)])

    luma = (0.299 * art[:, 0] + 0.587 * art[:, 1] + 0.114 * art[:, 2]).flatten(1)

    def mean_colour(mask: torch.Tensor) -> torch.Tensor:
        m = mask.float()[:, None]
        return ((art.flatten(2) * m).sum(2) / m.sum(2))[:, :, None, None]

    light_c = mean_colour(luma >= luma.quantile(0.9, dim=1, keepdim=True))
    dark_c = mean_colour(luma <= luma.quantile(0.1, dim=1, keepdim=True))
    painted = code * light_c + (1 - code) * dark_c

    rows = ["| images | decode rate | module accuracy | art similarity | prompt similarity |", "|---|---|---|---|---|"]

    def row(name: str, images: torch.Tensor, base: torch.Tensor) -> None:
        scan = scan_reward(images_hwc_uint8(images.clamp(0, 1)), codes)
        rew = model.art_reward(images.clamp(0, 1), prompts, base, scorer)
        rows.append(f"| {name} | {scan.components['decoded'].mean():.0%} | {scan.components['module_accuracy'].mean():.3f} | "
                    f"{np.mean(rew.components['clip_image']):.3f} | {np.mean(rew.components['clip_text']):.3f} |")
        print(rows[-1], flush=True)

    print("\n".join(rows), flush=True)
    row("base art (no ControlNet)", art, art)
    for s in (0.4, 0.5, 0.6, 0.8, 1.0):
        row(f"controlnet strength {s}", sample(model, prompts, codes, seeds, s, record=False).images, art)
    steps = model.steps
    for k, high, base in ((0, 0.8, 0.4), (steps // 2, 0.8, 0.4), (steps - 2, 0.8, 0.4), (steps - 1, 0.8, 0.4),
                          (steps - 2, 1.2, 0.4), (steps - 2, 1.2, 0.3)):
        curve = [base] * steps
        curve[k] = high
        row(f"one step: {base}, step {k + 1}/{steps} at {high}",
            sample(model, prompts, codes, seeds, curve, record=False).images, art)
    for curve in CURVES:
        row("curve: " + " ".join(f"{s:g}" for s in curve), sample(model, prompts, codes, seeds, list(curve),
                                                               record=False).images, art)
    for w in (0.2, 0.3, 0.4, 0.5, 0.6):
        row(f"overlay w={w}", (1 - w) * art + w * code, art)
    for w in (0.4, 0.5, 0.6, 0.7):
        row(f"palette w={w}", (1 - w) * art + w * painted, art)
    luma_img = luma.view_as(art[:, :1])
    painted_luma = 0.299 * painted[:, :1] + 0.587 * painted[:, 1:2] + 0.114 * painted[:, 2:]
    sign = code * 2 - 1  # +1 where the module is light
    median = luma.median(dim=1).values.view(-1, 1, 1, 1)
    for d in (0.03, 0.05, 0.07, 0.1):
        target = median + sign * d
        wrong = ((luma_img - target) * sign < 0).float()
        w_px = ((target - luma_img) / (painted_luma - luma_img + 1e-6)).clamp(0, 1) * wrong
        row(f"minimal d={d}", (1 - w_px) * art + w_px * painted, art)
    row("rendered art", rendered, rendered)
    for w in (0.3, 0.4, 0.5):
        row(f"rendered overlay w={w}", (1 - w) * rendered + w * code, rendered)
    print(f"\nToy model, {args.n} evaluation items, seeds 20000+; art similarity against the row's base art.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
