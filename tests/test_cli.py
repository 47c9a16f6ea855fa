"""The ``tofu-diffusion`` command and the demo's page."""

import json
import re

import pytest

from tofu_diffusion.eval import cli, demo


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert all(re.search(rf"^  {name}\s", printed, re.M) for name in cli.COMMANDS)
    assert cli.main([]) == 2  # no subcommand: the usage, and a usage error's status


def test_an_unknown_subcommand_names_the_choices(capsys):
    assert cli.main(["swep"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'swep'" in err and "sweep" in err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_subcommand_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tofu-diffusion {command}")


def test_explain_from_the_command_line(capsys):
    """The default at SD3's shift and 28 steps on the bundled joint-attention generator, from the shell."""
    assert cli.main(["explain", "--model", "tiny-mmdit", "--steps", "28", "--shift", "3"]) == 0
    printed = capsys.readouterr().out
    shifted = int(re.search(r"(\d+) of 28 steps reduced", printed).group(1))
    cli.main(["explain", "--model", "tiny-mmdit", "--steps", "28", "--ratio", "0.5"])
    assert "28 of 28 steps reduced" in capsys.readouterr().out
    assert 0 < shifted < 28


@pytest.mark.slow
def test_demo_writes_one_page_with_every_table_plot_and_grid(tmp_path):
    out = tmp_path / "results"
    path = demo.main(["--out", str(out), "--models", "tiny-dit", "--num-images", "4", "--steps", "2",
                      "--repeats", "1", "--timing-batch", "2", "--num-reference", "16"])
    page = (out / "index.html").read_text()
    result = json.loads((out / "sweep_tiny-dit" / "results.json").read_text())
    assert path == str(out / "index.html")
    # one table row per setting, each speedup with its interval, and every picture the page shows exists
    assert page.count("<tr") == 1 + len(result["rows"]) and page.count("x (") >= len(result["rows"])
    pictures = re.findall(r'<img src="([^"]+)"', page)
    assert len(pictures) == 1 + len(result["rows"])
    assert all((out / picture).stat().st_size > 500 for picture in pictures)
    assert json.loads((out / "demo.json").read_text())["total_minutes"] > 0
    headline = (out / "summary.md").read_text()
    assert headline.count("| tiny-dit |") == len(demo.HEADLINE) and "**default**" in headline
