"""The ``resilient`` command dispatches to its subcommands and explains itself."""

from resilient import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "status", "top", "inspect", "export"):
        assert name in out


def test_unknown_command_is_refused(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_subcommand_receives_its_arguments(capsys):
    assert cli.main(["run", "--standalone", "/nonexistent/train.py"]) == 2
    assert "does not exist" in capsys.readouterr().err
