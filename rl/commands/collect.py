"""``qr-rl collect``: record G seeds × prompts × payloads as trajectory shards, with a manifest.

Why separate from ``loop``: one collection (e.g. at one strength, for ``qr-rl train``) should
not need a curriculum. Runs on ComfyUI servers (``--server``, repeatable) or in-process
(``--backend local``, the embedded toy model). Re-running the same command resumes: jobs
already in the manifest are skipped.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "collect",
        help="record trajectory shards on ComfyUI servers or in-process, with a manifest",
        description=(
            "Record --seeds samples for every prompt × payload. With ComfyUI, each job is the API workflow "
            "with its inputs overridden by node title; the recorder's shard is downloaded into --out/shards and "
            "listed in --out/manifest.json (path, sha256, prompt, payload, seeds, strength, round)."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (manifest.json, shards/, samples/)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file with one prompt per line ('#' comments)")
    p.add_argument("--payload", action="append", default=[], help="a QR payload (repeatable)")
    p.add_argument("--payloads-file", default=None, help="text file with one payload per line")
    p.add_argument("--seeds", type=int, default=4, help="samples (seeds) per prompt × payload (default 4)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--batch", type=int, default=None, help="at most this many samples per job/shard (default --seeds)")
    p.add_argument("--round", type=int, default=0, help="curriculum round recorded in the manifest (default 0)")
    p.add_argument("--strength", type=float, default=1.0, help="ControlNet strength (default 1.0)")
    p.add_argument("--curve", default="constant",
                   help="per-step strength curve: constant (default), linear, cosine, exponential, step")
    p.add_argument("--end-ratio", type=float, default=1.0,
                   help="with a non-constant --curve, end strength = --strength × this (default 1)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the workflow's)")
    p.add_argument("--backend", choices=("comfy", "local"), default="comfy",
                   help="comfy: ComfyUI servers (default); local: in-process embedded toy model")
    p.add_argument("--server", action="append", default=[], help="ComfyUI URL (repeatable; default http://127.0.0.1:8188)")
    p.add_argument("--per-server-concurrency", type=int, default=1, help="jobs in flight per server (default 1)")
    p.add_argument("--workflow", default=None, help="API-format workflow (default workflows/api/qr_rl_collect.json)")
    p.add_argument("--set", action="append", default=[], help="override 'Title.input=value' (repeatable)")
    p.add_argument("--controlnet", default=None,
                   help="ControlNet: a name in ComfyUI's models/controlnet (comfy) or a file (local)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name in ComfyUI's models/checkpoints (comfy)")
    p.add_argument("--run", default="qr-rl", help="run name: ComfyUI writes shards to output/qr_rl/<run>/")
    p.add_argument("--job-timeout", type=float, default=1800.0, help="seconds per job before it is interrupted")
    p.add_argument("--toy-model", default=None, help="--backend local: toy model folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (sets 'RL Sampler.steps' for ComfyUI)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for --backend local")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..collect import collect, plan_jobs, read_lines

    prompts = list(args.prompt) + (read_lines(args.prompts_file, "prompts") if args.prompts_file else [])
    payloads = list(args.payload) + (read_lines(args.payloads_file, "payloads") if args.payloads_file else [])
    if args.backend == "local":
        from ..cli import require_extra

        require_extra("train")  # the toy model is a diffusers UNet
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from ..toy.backend import DEFAULT_PAYLOADS, LocalToyBackend, default_prompts

        backend = LocalToyBackend(args.toy_model, args.controlnet, steps=args.steps, run_name=args.run)
        prompts = prompts or default_prompts()
        payloads = payloads or list(DEFAULT_PAYLOADS)
    else:
        from ..comfy_backend import ComfyBackend, parse_set

        overrides = parse_set(args.set)
        if args.steps:
            overrides.setdefault("RL Sampler.steps", args.steps)
        backend = ComfyBackend(args.workflow, args.server or ["http://127.0.0.1:8188"], args.per_server_concurrency,
                               run_name=args.run, controlnet=args.controlnet, checkpoint=args.checkpoint,
                               negative=args.negative, curve=args.curve, end_ratio=args.end_ratio,
                               overrides=overrides, job_timeout=args.job_timeout)
    jobs = plan_jobs(prompts, payloads, args.seeds, args.seed_start, args.round, args.strength, args.batch,
                     args.controlnet or "")
    report = collect(jobs, backend, args.out, progress=not args.no_progress)
    print(json.dumps({"manifest": str(report.manifest), "jobs_run": report.done, "jobs_skipped": report.skipped,
                      "recovered": report.adopted, "seconds": round(report.seconds, 1), **report.summary}))
    return 0
