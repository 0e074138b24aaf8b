"""Command-line flags against the config dataclasses: one flag, one default, one help per setting.

Why: a default typed twice drifts (the loop's and the trainer's learning rate once lived in
several places). ``qr-rl train`` and ``qr-rl loop`` take every default from their dataclass
(flags not given are left out), and a help text that states a default must state that one.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from rl.commands import loop as loop_cmd
from rl.commands import train as train_cmd
from rl.loop import LoopConfig
from rl.train import TrainConfig

REQUIRED = ["--trajectories", "shards", "--checkpoint", "base.safetensors", "--controlnet", "cn.safetensors",
            "--out", "out.safetensors"]


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _stated_default(help_text: str) -> str | None:
    """The default a help text states: ``"X (default)"`` / ``"X (default: why)"`` → X, ``"(default X…)"`` → X.

    Only compared for settings whose default is not None (descriptive texts such as "(default:
    shipped SD1.5)" belong to settings that default to None).
    """
    m = re.search(r"([\w.+-]+) \(default\)", help_text) or re.search(r"([\w.+-]+) \(default:", help_text)
    if m and not re.search(r"\(default [^:]", help_text):
        return m.group(1)
    m = re.search(r"\(default:? ([^;),:\s]+)", help_text)
    return m.group(1) if m else None


def _check_stated(name: str, stated: str | None, default) -> str | None:
    if stated is None or default is None or isinstance(default, list):
        return None
    if isinstance(default, bool):
        return None
    if isinstance(default, (int, float)):
        try:
            ok = float(stated) == float(default)
        except ValueError:
            ok = False
    else:
        ok = stated == str(default)
    return None if ok else f"{name}: help says default {stated!r}, the dataclass says {default!r}"


def test_every_train_setting_has_one_flag_and_its_help_states_the_dataclass_default():
    defaults = _defaults(TrainConfig)
    fields = [f for f, _flag, _kw in train_cmd.OPTIONS]
    flags = [flag for _f, flag, _kw in train_cmd.OPTIONS]
    assert len(set(fields)) == len(fields) and len(set(flags)) == len(flags)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unmapped = sorted(names - set(fields) - set(train_cmd.NO_FLAG))
    assert not unmapped, f"TrainConfig fields {unmapped} need a flag in rl/commands/train.py OPTIONS (or NO_FLAG)"
    assert set(fields) | set(train_cmd.NO_FLAG) <= names, "OPTIONS / NO_FLAG name fields TrainConfig lacks"
    assert not set(fields) & set(train_cmd.NO_FLAG)
    wrong = []
    for field, flag, kw in train_cmd.OPTIONS:
        if kw.get("required"):
            assert field not in defaults, f"{flag} is required but {field} has a default"
            continue
        default = defaults[field]
        if kw.get("action") in ("store_true", "store_false"):
            assert default is (kw["action"] == "store_false"), f"{flag}: the flag flips {field}={default!r}"
            continue
        stated = _stated_default(kw["help"])
        if default is not None and stated is None:
            wrong.append(f"{flag}: the help does not state the default {default!r}")
        if "choices" in kw and default is not None:
            assert default in kw["choices"], f"{flag}: default {default!r} not among {kw['choices']}"
        wrong.append(_check_stated(flag, stated, default))
    assert [w for w in wrong if w] == []


def test_train_flags_left_out_take_the_dataclass_defaults():
    from rl.cli import build_parser

    parse = build_parser().parse_args
    plain = train_cmd.config_from_args(parse(["train", *REQUIRED]))
    assert plain == TrainConfig(trajectories=["shards"], checkpoint="base.safetensors", controlnet="cn.safetensors",
                                out="out.safetensors")
    given = train_cmd.config_from_args(parse(["train", *REQUIRED, "--full", "--lr", "3e-4", "--no-progress",
                                              "--step-weighting", "std", "--cpu"]))
    assert dataclasses.replace(plain, mode="full", lr=3e-4, progress=False, step_weighting="std", cpu=True) == given
    assert train_cmd.config_from_args(parse(["train", *REQUIRED, "--mode", "zero_convs"])).mode == "zero_convs"


@pytest.mark.parametrize("argv", [["--lr", "x"], ["--mode", "partial"]])
def test_train_flag_values_are_checked_by_argparse(argv, capsys):
    from rl.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *REQUIRED, *argv])
    assert "error" in capsys.readouterr().err


def _loop_defaults() -> dict:
    """LoopConfig's defaults, its trainer settings as ``train.<key>`` (the flag table's fields)."""
    out = _defaults(LoopConfig)
    for k, v in dataclasses.asdict(out.pop("train")).items():
        out[f"train.{k}"] = v
    return out


def test_every_loop_setting_has_one_flag_and_its_help_states_the_dataclass_default():
    defaults = _loop_defaults()
    fields = [f for f, *_ in loop_cmd.OPTIONS]
    assert sorted(fields) == sorted(defaults) and len(set(fields)) == len(fields)
    wrong = []
    for field, flag, kw in loop_cmd.OPTIONS:
        if kw.get("action") in ("store_true", "store_false"):
            assert defaults[field] is (kw["action"] == "store_false"), f"{flag}: the flag flips {field}"
            continue
        wrong.append(_check_stated(flag, _stated_default(kw["help"]), defaults[field]))
    assert [w for w in wrong if w] == []


def test_the_loops_trainer_settings_default_to_the_trainers_unless_listed():
    """LoopConfig nests the trainer's settings (rl.rounds.TrainerSettings, TrainConfig's defaults);
    the loop overrides only what rl.loop.LOOP_TRAINER lists, and each override differs."""
    from rl.loop import LOOP_TRAINER

    loop, train = dataclasses.asdict(LoopConfig().train), _defaults(TrainConfig)
    assert {"lr", "lora_rank", "clip_range", "epochs", "batch_size"} <= set(loop) <= set(train)
    drift = {k: (v, train[k]) for k, v in loop.items() if k not in LOOP_TRAINER and v != train[k]}
    assert drift == {}, f"loop defaults drifted from the trainer's: {drift}"
    assert all(loop[k] == v != train[k] for k, v in LOOP_TRAINER.items()), "an override that no longer differs"
