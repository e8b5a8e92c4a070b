"""Every command rejects a flag it does not know, naming it (exit 2, no traceback), before doing any work (issue 22).

Commands that read config overrides (train, finetune, experiment, ablations, demo, cache-features) accept only `--section.key VALUE` /
`--key VALUE` naming a field of LLMModulesConfig (or a key inside a free-form mapping such as small.config); the
others accept nothing undeclared. Abbreviations are not accepted either: `--max-step 5` used to mean --max-steps.
The list of commands comes from build_parser(), so a command added later is covered without editing this file.
"""
from __future__ import annotations

import argparse

import pytest

import llm_modules.__main__ as cli
from llm_modules.__main__ import build_parser, main, subcommands

COMMANDS = sorted(subcommands(build_parser()))
TAKES_OVERRIDES = {"train", "finetune", "experiment", "ablations", "demo", "cache-features"}


def required(sub: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for what `sub` requires (never used: the unknown flag is refused before the command)."""
    argv: list[str] = []
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings and a.nargs not in ("?", "*"):
            argv.append(str(next(iter(a.choices))) if a.choices else "x")
        elif a.option_strings and a.required:
            argv += [a.option_strings[-1], str(next(iter(a.choices))) if a.choices else "x"]
    return argv


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every sub-command's function fails the test if it is reached."""
    ran = []
    for name in dir(cli):
        if name.startswith("cmd_"):
            monkeypatch.setattr(cli, name, lambda args, extra, _n=name: ran.append((_n, extra)) or 0)
    return ran


def test_the_commands_that_take_config_overrides():
    parser = build_parser()
    assert {n for n, sub in subcommands(parser).items() if sub.get_default("config_overrides")} == TAKES_OVERRIDES
    assert not [n for n, sub in subcommands(parser).items() if sub.get_default("extra_ok")]  # the old, silent switch


def _misspelt(sub: argparse.ArgumentParser) -> str:
    """The command's first long option cut short by one letter: what argparse used to take as an abbreviation."""
    return next(o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help")[:-1]


@pytest.mark.parametrize("kind", ["unknown", "misspelt"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_rejects_an_unknown_flag(command, kind, nothing_runs, capsys):
    sub = subcommands(build_parser())[command]
    flag = "--bogus-flag" if kind == "unknown" else _misspelt(sub)
    code = main([command, *required(sub), flag, "3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"llm-modules {command}: error: unrecognized argument" in err and flag in err, err
    assert "Traceback" not in err
    assert not nothing_runs, f"{command} ran despite {flag}"


@pytest.mark.parametrize("command", COMMANDS)
def test_config_overrides_only_where_a_command_reads_them(command, nothing_runs, capsys):
    sub = subcommands(build_parser())[command]
    code = main([command, *required(sub), "--train.lr_bridge", "1e-4", "--small.config.embed_dropout", "0",
                 "--coupling", "none"])
    err = capsys.readouterr().err
    if command in TAKES_OVERRIDES:
        assert code == 0 and len(nothing_runs) == 1, err
        assert nothing_runs[0][1] == ["--train.lr_bridge", "1e-4", "--small.config.embed_dropout", "0", "--coupling",
                                      "none"]
    else:
        assert code == 2 and "unrecognized arguments: --train.lr_bridge 1e-4" in err and not nothing_runs, err


@pytest.mark.parametrize("argv,message", [
    (["train", "--config", "c.yaml", "--max-step", "5"],
     "unrecognized argument --max-step (did you mean --max-steps?): not an option of `llm-modules train` nor a "
     "config field"),
    (["train", "--config", "c.yaml", "--train.max_step", "5"],
     "unrecognized argument --train.max_step (did you mean --train.max_steps?): train.max_step: unknown key; "
     "allowed in train: batch_size,"),
    (["cache-features", "--config", "c.yaml", "--bridge.num_layers.x", "1"],
     "bridge.num_layers is a value, not a section"),
    (["demo", "--bridge", "1", "--trian.seed", "2"], "unrecognized argument --trian.seed (did you mean --train.seed?): "
                                                     "trian: unknown key"),
    (["ablations", "--budget", "1", "stray"], "unrecognized argument 'stray'"),
    (["experiment", "--quick", "stray"], "unrecognized argument 'stray'"),
    (["eval", "--checkpoint", "d", "--max-examples", "2", "--bogus-flag", "3"],
     "unrecognized arguments: --bogus-flag 3"),
    (["eval", "--checkpoint", "d", "--max-example", "50"],
     "unrecognized arguments: --max-example 50 (did you mean --max-examples?)"),
    (["generate", "--checkpoint", "d", "--max-new", "3"],
     "unrecognized arguments: --max-new 3 (did you mean --max-new-tokens?)"),
])
def test_the_message_names_the_flag_and_a_likely_fix(argv, message, nothing_runs, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and not nothing_runs, err


def test_exponent_numbers_in_overrides_are_numbers():
    from llm_modules.config import parse_overrides

    assert parse_overrides(["--train.lr_bridge", "1e-4", "--train.lr_small=2.5E-5", "--data.system_prompt", "e5"]) == [
        ("train.lr_bridge", 1e-4), ("train.lr_small", 2.5e-5), ("data.system_prompt", "e5")]
