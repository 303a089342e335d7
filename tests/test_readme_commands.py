"""Every `python -m jobs.<name> ...` in README.md's bash blocks runs as printed, as far as can be told without
running it: its arguments parse with the job's own parser (`build_parser()`), a `--config` loads with its
`key=value` overrides through the job's loader (a recipe's `<required>` keys must be given on the line), and
`ray job submit` options in front of it are options of Ray's CLI. A `$VAR` assigned earlier in the same block
(`VAR=value`, `export VAR=value`) is replaced by its value, as the shell would; any other `$VAR` is an opaque
value."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
JOB = re.compile(r"\bpython -m jobs\.(\w+)")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*", re.S)
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Command:
    line: int  # README line the command starts on
    text: str  # the command with its continuation lines joined
    job: str
    argv: list[str]  # the job's arguments
    ray_submit: list[str] | None  # `ray job submit` options in front of it, if any

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(text: str) -> list[Command]:
    """The job commands of the ```bash blocks of `text`, continuation lines (`\\` at the end) joined."""
    out, in_bash, pending, start, shell = [], False, "", 0, {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_bash, pending, shell = line.strip() == "```bash", "", {}
            continue
        if not in_bash:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        words = shlex.split(logical, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        if words and all(ASSIGNMENT.fullmatch(w) for w in words):
            shell.update(w.split("=", 1) for w in words)
            continue
        m = JOB.search(logical)
        if m is None:
            continue
        tokens = _expand(shlex.split(logical[m.start():], comments=True), shell)
        before = _expand(shlex.split(logical[:m.start()], comments=True), shell)
        ray = None
        if before[:3] == ["ray", "job", "submit"]:
            assert before[-1] == "--", f"README.md:{start}: ray job submit without `--` before the entrypoint"
            ray = before[3:-1]
        else:
            assert not before, f"README.md:{start}: unexpected words before python -m: {before}"
        out.append(Command(start, " ".join(logical.split()), m.group(1), tokens[3:], ray))
    return out


def _expand(words: list[str], shell: dict[str, str]) -> list[str]:
    """Each word with the variables `shell` assigns replaced, as the shell expands a quoted word (not re-split)."""
    return [VARIABLE.sub(lambda v: shell.get(v.group(1) or v.group(2), v.group(0)), w) for w in words]


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands_of_every_kind():
    jobs = {c.job for c in COMMANDS}
    assert {"convert_checkpoint", "prepare_data", "inspect_data", "finetune", "pretrain", "evaluate", "serve",
            "sweep"} <= jobs
    assert any(c.ray_submit is not None for c in COMMANDS)


def _load(job: str, args) -> None:
    """What the job does with its arguments before any work: load and check its config (ConfigError if bad)."""
    from ofa_model.config_files import load_config

    if job in ("finetune", "pretrain"):
        from pipelines.train.train_config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
        assert job == "finetune" or cfg.mixture, f"{args.config}: pretraining needs a mixture"
    elif job == "sweep":
        from tune.search import load_sweep_config, plan_sweep

        overrides = [*args.overrides, *([f"num_samples={args.num_samples}"] if args.num_samples else [])]
        plan = plan_sweep(load_sweep_config(args.config, overrides), source=args.config)
        assert plan.base.task == args.task, f"--task {args.task}: {args.config} tunes {plan.base.task}"
    elif job == "serve":
        from serve_app.serve_config import serve_config

        serve_config(args.config, args.overrides, model=args.model, host=args.host, port=args.port)
    elif job == "inspect_data":
        from jobs.inspect_data import _data_config

        _data_config(args)
    elif job == "evaluate":
        assert args.limit is None or args.limit >= 1, "--limit must be >= 1"


def check(command: Command) -> None:
    """Parse and load `command` as its job would; AssertionError naming the README line if it would not run."""
    module = importlib.import_module(f"jobs.{command.job}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = module.build_parser().parse_args(command.argv)
    except SystemExit as exc:
        raise AssertionError(f"{command}\n  does not parse: {err.getvalue().strip() or exc}") from None
    try:
        _load(command.job, args)
    except (ValueError, OSError, AssertionError) as exc:  # ConfigError is a ValueError
        raise AssertionError(f"{command}\n  does not load: {exc}") from None
    if command.ray_submit is not None:
        import click
        from ray.dashboard.modules.job.cli import submit

        try:
            submit.make_context("submit", [*command.ray_submit, "--", "python"])
        except click.ClickException as exc:
            raise AssertionError(f"{command}\n  ray job submit: {exc.format_message()}") from None


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}-{c.job}" for c in COMMANDS])
def test_every_readme_command_runs_as_printed(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository root, as in the README
    if "search=optuna" in command.argv:  # the README installs the extra beside it (pip install -e '.[tune]')
        assert "[tune]" in command.text
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: ModuleSpec(name, None) if name == "optuna" else find_spec(name, *a))
    check(command)


@pytest.mark.parametrize("snippet,complaint", [
    ("python -m jobs.evaluate --model m --data d --task vqa --bogus 1", "unrecognized arguments: --bogus"),
    ("python -m jobs.evaluate --data d --task vqa", "the following arguments are required: --model"),
    ("python -m jobs.evaluate --model m --data d --task vqa --precision fp8", "invalid choice: 'fp8'"),
    ("python -m jobs.finetune --config configs/finetune/vqa.yaml \\\n    data.uri=$DATA_URI",
     "model.init is required"),
    ("python -m jobs.finetune --config configs/finetune/vqa_easyvqa.yaml optim.nope=1", "optim.nope"),
    ("ray job submit --wd . -- python -m jobs.evaluate --model m --data d --task vqa", "No such option '--wd'"),
])
def test_a_broken_command_fails_naming_its_line(snippet, complaint, monkeypatch):
    monkeypatch.chdir(ROOT)
    [command] = readme_commands(f"text\n```bash\n# a comment\n{snippet}\n```\n")
    assert command.line == 4
    with pytest.raises(AssertionError, match="README.md:4: ") as info:
        check(command)
    assert complaint in str(info.value)
