"""Every ``cadscope`` subcommand's help ends with an example of its use."""

from __future__ import annotations

import pytest

from cadscope.workers.cli import main

SUBCOMMANDS = ("run", "worker", "api", "trace", "exec", "doctor")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    example = text.split("example:\n", 1)
    assert len(example) == 2, text
    assert example[1].lstrip().startswith(("cadscope " + command, "CELERY_BROKER_URL=", "CADSCOPE_API_TOKEN="))
    assert f"cadscope {command}" in example[1]


def test_the_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"cadscope {command}" in text for command in SUBCOMMANDS)
