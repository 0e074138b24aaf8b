"""`qr-rl demo --quick` end to end: every report file, through the real sampler, rewards, shard
format and the ControlNet trainer (rwr by default; ddpo in `test_schedule_only_and_plain_runs`)."""

from __future__ import annotations

import json

import pytest
import torch


def test_demo_quick_writes_the_whole_report(tmp_path, capsys):
    from rl.cli import main
    from rl.toy.model import ToyModel
    from rl.trajectory import read_shard
    from rl.weights import load_controlnet

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--learn-feedback"]) == 0
    for name in ("summary.json", "table.md", "curves.png", "samples.png", "controlnet.safetensors", "rounds.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    # the report contract: the ControlNet in a plain sampler and with the tricks, before and after,
    # judged by the trained-on art reward and by the held-out structure judge
    assert summary["trained_controlnet"] is True and summary["objective"] == "rwr"
    for block in ("plain", "tricks"):
        for side in ("before", "after"):
            for key in ("decode_rate", "module_accuracy", "art_similarity", "art_heldout"):
                assert 0.0 <= summary[block][side][key] <= 1.0, (block, side, key)
    assert summary["plain"]["after"] != summary["plain"]["before"]  # the tuned file is evaluated, not the old one
    assert isinstance(summary["aim_met"], bool)
    # one AdamW for the run: round 2's trainer starts from round 1's moments
    run2 = json.loads((out / "rounds" / "r001" / "controlnet.run" / "result.json").read_text())
    assert run2["data"]["optimizer_from"].endswith("controlnet.run") and run2["data"]["objective"] == "rwr"
    model = ToyModel.load()
    assert summary["strengths"][0] == pytest.approx(model.curriculum_start)  # curriculum starts higher
    assert model.demo_strength < model.curriculum_start <= model.high_strength
    assert summary["strengths"][-1] == pytest.approx(model.demo_strength)  # ... and ends at the demo strength
    assert summary["wall_time_s"] > 0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == summary["rounds"] == 2
    shard = read_shard(rounds[0]["shard"])
    assert shard.meta["curriculum_round"] == 0 and "reward.decoded" in shard.tensors()
    # the strength curve is learned too: each sample drew its own schedule, recorded per sample
    assert shard.strength.shape == (shard.batch_size, model.steps) and shard.strength.std() > 0
    # ... in mirrored pairs (+δ, −δ on one seed): each pair's geometric mean is round 0's curve, the base strength
    pair_mean = (shard.strength[0::2] * shard.strength[1::2]).sqrt()
    assert torch.allclose(pair_mean, torch.full_like(pair_mean, model.curriculum_start), atol=1e-5)
    assert not torch.allclose(shard.strength[0::2], shard.strength[1::2])
    # the art budget: each sample's margin over the floor is recorded, and the price moves per round
    assert "reward.art_margin" in shard.tensors()
    assert summary["art_floor"] > 0 and summary["art_price"] >= 0
    assert all("art_price" in row and "art_gap" in row for row in rounds)
    # ... held by the curve's level (rl.art_budget.LevelBudget): PGPE learns only the tilt
    assert all("level_step" in row and row["art_slope"] < 0 for row in rounds)
    # paired floors: each round's floor is 0.95 × the pretrained ControlNet's art on its own items
    assert all(0 < row["art_floor"] < 1 and row["art_gap"] == pytest.approx(row["art_floor"] - row["art_similarity"])
               for row in rounds)
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["updates"] == 2 and sched["keyframes"] == summary["schedule"]["keyframes"]
    assert summary["averaged_rounds"] == 1  # a quarter of 2 rounds, rounded up: the last one's curve
    assert summary["after_mean_strength"] == pytest.approx(sched["mean_strength"], rel=1e-5)
    assert rounds[-1]["schedule_gains"] != [1.0] * model.steps
    log_gain = torch.tensor(sched["log_gain"])  # a level and a tilt: a straight line in log-gain
    assert sched["shape"] == "level_slope" and torch.allclose(log_gain.diff(), log_gain.diff()[:1].expand(model.steps - 1), atol=1e-5)
    # module feedback: each sample drew its own (low, high) gains, the shard says so, the mean is learned
    gains = shard.meta["module_feedback"]["gains"]
    assert len(gains) == shard.batch_size and len({tuple(g) for g in gains}) == shard.batch_size
    assert shard.meta["module_feedback"]["ramp"] == 1.0
    fb = summary["module_feedback"]
    assert fb["ramp"] == 1.0
    assert sched["module_feedback"] == fb and (fb["low"], fb["high"]) != (0.8, 2.0)
    node = sched["comfyui_inputs"]  # the RL sampler node's widgets that apply what was learned
    assert node["node"] == "QRControlNetSamplerRL" and node["inputs"]["keyframes"] == sched["keyframes"]
    assert node["inputs"]["feedback_low"] == pytest.approx(fb["low"], abs=1e-4) and node["inputs"]["feedback_ramp"] == 1.0
    assert rounds[-1]["feedback_gains"] == pytest.approx([fb["low"], fb["high"]], abs=1e-4)
    # luma-only control (the default) is recorded, and schedule.json turns on the node's switch for it
    assert shard.meta["luma_control"] == {"kind": "folded_luma", "factor": 2} and summary["config"]["luma_control"]
    assert sched["luma_control"] is True and node["inputs"]["luma_control"] is True and "luma-only control" in node["note"]
    # ... each step's gain map is recorded (ones on step 1, which has no prediction yet) ...
    maps = shard.strength_map
    assert maps is not None and maps.shape[:3] == (shard.batch_size, model.steps, 1)
    assert bool((maps[:, 0] == 1).all()) and float((maps[:, 1:] - 1).abs().max()) > 0.1
    # ... and the trainer refuses a feedback shard without its maps: it could not replay them
    from rl.errors import QRRLError
    from rl.train import TrainConfig, train
    from rl.trajectory import write_shard

    shard.strength_map = None
    write_shard(shard, tmp_path / "mapless", "old")
    with pytest.raises(QRRLError, match="does not record its gain maps"):
        train(TrainConfig(trajectories=[str(tmp_path / "mapless")], checkpoint=model.unet_path,
                          controlnet=model.controlnet_path, out=tmp_path / "cn.safetensors",
                          unet_config=model.unet_config_path, controlnet_config=model.controlnet_config_path,
                          mode="zero_convs", cpu=True, progress=False), log=lambda m: None)
    tuned = load_controlnet(out / "controlnet.safetensors", model.controlnet_config_path)  # loadable, and trained
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.controlnet.state_dict().values()))
    printed = capsys.readouterr().out
    assert "decode rate" in printed and "tuned" in printed and "held out" in printed
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2  # never overwrites a report


def test_demo_without_shards_keeps_the_controlnet(tmp_path):
    """keep_shards=False (what bench/learning.py uses) drops rounds/ but not the trained ControlNet."""
    from rl.toy.demo import DemoConfig, run_demo

    res = run_demo(DemoConfig.quick(tmp_path / "d", rounds=1, hold_rounds=1, eval_samples=4, keep_shards=False,
                                    progress=False), log=lambda m: None)
    assert not (res.out / "rounds").exists()
    assert (res.out / "controlnet.safetensors").stat().st_size > 0
    assert json.loads((res.out / "summary.json").read_text())["plain"]["after"]["decode_rate"] >= 0.0


def test_bad_trainer_options_are_refused_before_any_sampling(tmp_path):
    """The demo checks the trainer options the way `qr-rl train` does, before its first round."""
    from rl.errors import QRRLError
    from rl.toy.demo import DemoConfig, demo_trainer

    with pytest.raises(QRRLError, match="anchor-decay needs --mode"):
        DemoConfig(out=tmp_path, train=demo_trainer(mode="lora", anchor_decay=0.1)).validate()
    with pytest.raises(QRRLError, match="--mode must be one of"):
        DemoConfig(out=tmp_path, train=demo_trainer(mode="zero-convs")).validate()
    DemoConfig(out=tmp_path, train=demo_trainer(mode="zero_convs", anchor_decay=0.05)).validate()


def test_schedule_only_and_plain_runs(tmp_path):
    """--no-module-feedback learns only the curve (the ControlNet stays the pretrained one);
    --no-learn-schedule --train-controlnet is constant-strength DDPO, here with module feedback and
    luma-only control, whose recorded gain maps and projection the trainer replays exactly."""
    from rl.cli import main
    from rl.errors import QRRLError
    from rl.toy.demo import DemoConfig, demo_trainer
    from rl.trajectory import read_shard

    out = tmp_path / "sched"
    assert main(["demo", "--quick", "--rounds", "1", "--hold-rounds", "1", "--eval-samples", "4", "--out", str(out),
                 "--no-progress", "--no-module-feedback", "--art-budget", "price", "--schedule-shape", "per_step",
                 "--no-train-controlnet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert "level_step" not in row and row["art_price"] >= 0  # the PI price, and ten per-step gains
    assert summary["schedule"]["shape"] == "per_step"
    assert not summary["trained_controlnet"] and summary["schedule"]["updates"] == 1
    assert summary["module_feedback"] is None
    assert not (out / "controlnet.safetensors").exists()  # nothing trained: no file that looks trained
    assert summary["plain"]["after"] == summary["plain"]["before"] and not summary["aim_met"]
    plain = tmp_path / "plain"
    assert main(["demo", "--quick", "--rounds", "1", "--hold-rounds", "1", "--eval-samples", "4", "--out", str(plain),
                 "--no-progress", "--no-learn-schedule", "--objective", "ddpo", "--art-floor", "0"]) == 0
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["trained_controlnet"] and summary["objective"] == "ddpo" and summary["module_feedback"]["ramp"] == 1.0
    row = json.loads((plain / "rounds.jsonl").read_text().splitlines()[0])
    assert read_shard(row["shard"]).strength_map is not None
    assert row["logp_drift_max_abs"] < 1e-3  # the trainer recomputes exactly what was sampled, maps included
    assert read_shard(row["shard"]).meta["luma_control"] == {"kind": "folded_luma", "factor": 2}  # ... and luma control
    assert summary["schedule"] is None and summary["art_floor"] is None and not (plain / "schedule.json").exists()
    hinge = tmp_path / "hinge"  # --art-price-lr 0: the per-sample hinge instead of the priced mean
    assert main(["demo", "--quick", "--rounds", "1", "--hold-rounds", "1", "--eval-samples", "4", "--out", str(hinge),
                 "--no-progress", "--no-train-controlnet", "--art-budget", "price", "--art-price-lr", "0"]) == 0
    summary = json.loads((hinge / "summary.json").read_text())
    assert summary["art_floor"] > 0 and summary["art_price"] is None
    # the default holds the feedback gains where they are: every sample uses them, and so does the result
    shard = read_shard(json.loads((hinge / "rounds.jsonl").read_text().splitlines()[0])["shard"])
    assert all(g == pytest.approx([0.8, 2.0]) for g in shard.meta["module_feedback"]["gains"])
    assert (summary["module_feedback"]["low"], summary["module_feedback"]["high"]) == (0.8, 2.0)
    with pytest.raises(QRRLError, match="nothing to learn"):
        DemoConfig(out=tmp_path, learn_schedule=False, train_controlnet=False).validate()
    with pytest.raises(QRRLError, match="objective"):
        DemoConfig(out=tmp_path, train=demo_trainer(objective="hope")).validate()
    with pytest.raises(QRRLError, match="art-floor"):
        DemoConfig(out=tmp_path, art_floor=1.5).validate()
    with pytest.raises(QRRLError, match="art-price-lr"):
        DemoConfig(out=tmp_path, art_price_lr=-1.0).validate()
    with pytest.raises(QRRLError, match="art-budget"):
        DemoConfig(out=tmp_path, art_budget="hope").validate()
    with pytest.raises(QRRLError, match="schedule-shape"):
        DemoConfig(out=tmp_path, schedule_shape="wiggly").validate()
    with pytest.raises(QRRLError, match="steps-from"):
        DemoConfig(out=tmp_path, train_controlnet=True, module_feedback=False,
                   train=demo_trainer(steps_from=1.0)).validate()
    with pytest.raises(QRRLError, match="average-last"):
        DemoConfig(out=tmp_path, average_last=0.0).validate()
    with pytest.raises(QRRLError, match="gains must be >= 0"):
        DemoConfig(out=tmp_path, feedback_low=-1.0).validate()


def test_the_art_budget_follows_the_curriculum_strength(tmp_path):
    """A curriculum round at a higher strength is allowed the art that strength costs the
    pretrained ControlNet on the same items: the paired floors are measured at the round's strength."""
    from rl.art_budget import LevelBudget
    from rl.files import sha256_file as file_sha256
    from rl.toy.demo import DemoConfig, collect_round
    from rl.toy.model import ToyModel

    model = ToyModel.load()
    cfg = DemoConfig(out=tmp_path, groups=2, group_size=4, progress=False)
    scorer = model.clip_scorer()
    sha = file_sha256(model.unet_path)
    floors = {}
    for s in (model.demo_strength, model.high_strength):  # the same round index: the same items and seeds
        row, _ = collect_round(model, None, model.controlnet_path, s, 0, cfg, tmp_path / f"s{s}", scorer, sha,
                               budget=LevelBudget(floor=0.8))
        floors[s] = row["art_floor"]
    assert floors[model.high_strength] < floors[model.demo_strength] - 0.01


def test_round_items_pair_seeds_only_when_exploring_in_pairs(tmp_path):
    from rl.errors import QRRLError
    from rl.toy.demo import DemoConfig, round_items

    _, _, seeds = round_items(DemoConfig(out=tmp_path), 1000, 0)
    assert seeds[0::2] == seeds[1::2] and len(set(seeds)) == len(seeds) // 2
    for cfg in (DemoConfig(out=tmp_path, mirrored=False), DemoConfig(out=tmp_path, learn_schedule=False,
                                                                       train_controlnet=True)):
        _, _, seeds = round_items(cfg, 1000, 0)
        assert len(set(seeds)) == len(seeds)  # nothing to mirror, or mirroring off: every seed distinct
    with pytest.raises(QRRLError, match="group-size must be even"):
        DemoConfig(out=tmp_path, group_size=5).validate()


def test_curriculum_starts_where_most_samples_scan():
    """The shipped calibration picks the first strength above the demo's where ≥ 80% of samples
    scan: the one below it scans less, and the start is a calibrated row, not a constant."""
    from rl.toy.model import ToyModel

    model = ToyModel.load()
    rows = sorted(model.info["calibration"], key=lambda row: row["strength"])
    above = [row for row in rows if row["strength"] > model.demo_strength]
    start = next(row for row in above if row["strength"] == pytest.approx(model.curriculum_start))
    assert start["decode_rate"] >= 0.8
    assert all(row["decode_rate"] < 0.8 for row in above if row["strength"] < start["strength"])
    assert model.demo_strength < model.curriculum_start <= model.high_strength


def test_demo_config_file_documents_every_default(tmp_path, capsys):
    """configs/demo.toml lists the demo's settings at their defaults (one default per setting; the
    trainer's in [demo.train]), a file can change them, the flat trainer keys of earlier releases
    still work with a warning, unknown keys are refused, and --help shows only the few everyday flags."""
    import subprocess
    import sys
    from dataclasses import asdict, fields
    from pathlib import Path

    from rl.errors import QRRLError
    from rl.rounds import TrainerSettings
    from rl.toy.demo import DEMO_FIXED, DemoConfig

    shipped = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
    settings = DemoConfig.toml_settings(shipped)
    defaults = DemoConfig(out=tmp_path)
    train = settings.pop("train")
    assert settings and all(getattr(defaults, k) == v for k, v in settings.items()), settings
    assert train and all(getattr(defaults.train, k) == v for k, v in train.items()), train
    optional = {"out", "model", "start_strength", "strength", "threads", "progress", "train"}  # commented or run-time
    assert {f.name for f in fields(DemoConfig)} - optional <= set(settings)
    assert set(TrainerSettings.keys()) - set(DEMO_FIXED) <= set(train)
    mine = tmp_path / "mine.toml"
    mine.write_text('[demo]\nrounds = 3\nfeedback-high = 2.5\n[demo.train]\nlr = 3e-4\n')
    assert DemoConfig.toml_settings(mine) == {"rounds": 3, "feedback_high": 2.5, "train": {"lr": 3e-4}}
    mine.write_text('rounds = 3\nlr = 3e-4\ntrain_batch_size = 8\n')  # the flat keys of earlier releases
    assert DemoConfig.toml_settings(mine) == {"rounds": 3, "train": {"lr": 3e-4, "batch_size": 8}}
    assert "'train_batch_size' is deprecated: set it as 'batch_size' in the [demo.train] table" in capsys.readouterr().err
    assert asdict(DemoConfig(out=tmp_path).train)["objective"] == "rwr"
    mine.write_text('rounds = 3\nwobble = 1\n')
    with pytest.raises(QRRLError, match="unknown demo settings .*wobble"):
        DemoConfig.toml_settings(mine)
    mine.write_text('[train]\ncpu = false\n')  # the demo fixes it
    with pytest.raises(QRRLError, match="unknown demo settings .*train.cpu"):
        DemoConfig.toml_settings(mine)
    helptext = subprocess.run([sys.executable, "-m", "rl", "demo", "--help"], capture_output=True, text=True).stdout
    assert "--config" in helptext and "--feedback-low" not in helptext and len(helptext.splitlines()) < 50


def test_scan_guidance_from_the_config_file_is_recorded_and_distilled(tmp_path):
    """``scan_guidance = true`` in the demo's config: the rounds sample with it, the shards say so
    (rl.scan_guidance: their predictions are the guided ones), and rwr trains on them."""
    from rl.cli import main
    from rl.trajectory import read_shard

    cfg = tmp_path / "demo.toml"
    cfg.write_text("scan_guidance = true\nguidance_margin = 0.06\n")
    out = tmp_path / "guided"
    assert main(["demo", "--quick", "--config", str(cfg), "--rounds", "1", "--hold-rounds", "1", "--eval-samples",
                 "4", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    spec = read_shard(row["shard"]).meta["scan_guidance"]
    assert spec["margin"] == 0.06 and spec["start"] == 0.95 and spec["scale"] == 1.0
    assert summary["trained_controlnet"] and summary["objective"] == "rwr" and (out / "controlnet.safetensors").is_file()
