"""The `coalign` command itself: fast start (nothing heavy imported for help), --version, one-line usage errors,
shipped configs by name (also from a built wheel), examples in every subcommand's help."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from coalign import __version__
from coalign.cli import LIGHTNING_SUBCOMMANDS, TOOLS, main
from coalign.command import UserError, resolve_config, resolve_config_args, shipped_configs

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers", "diffusers", "faiss", "gradio")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # jsonargparse ends --help with SystemExit(0)
        return int(exit_.code or 0)


def test_help_version_and_tool_help_import_nothing_heavy():
    code = f"""
import sys
import coalign
assert coalign.__version__
heavy = {HEAVY!r}
assert not [m for m in heavy if m in sys.modules], ("import coalign", [m for m in heavy if m in sys.modules])
from coalign.cli import main
assert main(["--help"]) == 0 and main(["--version"]) == 0 and main(["bogus"]) == 2
try:
    main(["synthesize", "--help"])
except SystemExit:
    pass
print("LOADED", [m for m in heavy if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_top_level_help_lists_every_subcommand_in_plain_text(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in [*LIGHTNING_SUBCOMMANDS, *TOOLS]:
        assert f"\n  {name} " in text
    assert "examples:" in text and "coalign fit --config quickstart" in text
    assert "``" not in text and ":class:" not in text and ":mod:" not in text  # no RST markup
    assert main([]) == 0 and capsys.readouterr().out == text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"coalign {__version__}"


def test_an_unknown_subcommand_lists_them_all_in_one_line(capsys):
    assert main(["bogus"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "'bogus'" in lines[0] and captured.out == ""
    for name in [*LIGHTNING_SUBCOMMANDS, *TOOLS]:
        assert name in lines[0]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_bare_lightning_subcommand_points_at_the_quickstart(subcommand, capsys):
    assert main([subcommand]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"coalign {subcommand} --config quickstart" in err[0]
    # with anything that configures the run the hint steps aside (here: a missing file, reported by the resolver)
    assert main([subcommand, "--config", "no_such_config"]) == 2
    assert "no such file, nor a shipped config" in capsys.readouterr().err


def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
    root = shipped_configs()
    assert root == REPO / "configs"
    monkeypatch.chdir(tmp_path)  # outside the repository: configs/... paths do not exist here
    assert resolve_config("quickstart") == str(root / "quickstart.yaml")
    assert resolve_config("trainer/cpu") == str(root / "trainer" / "cpu.yaml")
    assert resolve_config("supervised_cirr") == str(root / "experiments" / "supervised_cirr.yaml")  # unique stem
    assert resolve_config("configs/quickstart.yaml") == str(root / "quickstart.yaml")  # the README's spelling
    assert resolve_config("synthesis/tiny.yaml") == str(root / "synthesis" / "tiny.yaml")
    # an existing file wins over a shipped name; inline YAML and unknown file names pass through untouched
    (tmp_path / "quickstart").write_text("seed_everything: 3\n")
    assert resolve_config("quickstart") == "quickstart"
    assert resolve_config("{seed_everything: 3}") == "{seed_everything: 3}"
    assert resolve_config("mine.yaml") == "mine.yaml"
    with pytest.raises(UserError, match=r"--config nope: no such file.*quickstart, .*trainer/cpu"):
        resolve_config("nope")
    argv = ["fit", "--config", "trainer/cpu", "-c", "data/shapes", "--config=model/coalign_tiny", "--x", "quickstart"]
    assert resolve_config_args(argv) == [
        "fit", "--config", str(root / "trainer/cpu.yaml"), "-c", str(root / "data/shapes.yaml"),
        "--config=" + str(root / "model/coalign_tiny.yaml"), "--x", "quickstart",
    ]  # fmt: skip


def test_a_tool_takes_a_shipped_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run(["synthesize", "--config", "synthesis/tiny", "--output", "x", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "prompts:" in printed and "render:" in printed
    assert _run(["synthesize", "--config", "synthesis/nope", "--output", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalign synthesize: error: --config synthesis/nope")


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_help_has_plain_text_examples(tool, capsys):
    assert _run([tool, "--help"]) == 0
    text = capsys.readouterr().out
    examples = text[text.index("examples:") :]
    assert f"\n  coalign {tool} " in examples
    assert "``" not in examples


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_lightning_subcommand_help_has_examples_and_no_top_level_optimizer(subcommand, capsys):
    assert _run([subcommand, "--help"]) == 0
    text = capsys.readouterr().out
    examples = text[text.index("examples:") :]
    assert f"\n  coalign {subcommand} --config quickstart" in examples  # line breaks kept
    assert "--model.optimizer" in text
    assert "\n  --optimizer" not in text and "\n  --lr_scheduler" not in text  # one optimizer setting: the model's


@pytest.mark.slow
def test_an_installed_wheel_ships_the_configs(tmp_path):
    """Build the wheel, install it (no dependencies) into a venv that sees this interpreter's packages, and run
    `coalign fit --config quickstart --print_config` from an empty folder."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, timeout=600)  # fmt: skip
    wheel = next(wheels.glob("coalign-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "coalign/configs/quickstart.yaml" in names and "coalign/configs/trainer/cpu.yaml" in names
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([env_dir / "bin" / "coalign", "fit", "--config", "quickstart", "--print_config"], cwd=work,
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "max_steps: 400" in out.stdout
    where = subprocess.run([python, "-c", "import coalign.command as c; print(c.shipped_configs())"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout  # fmt: skip
    assert str(env_dir) in where
