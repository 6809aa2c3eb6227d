"""The ``fairdiff`` console script: subcommands listed, unknown ones refused, user errors on one line."""

import subprocess
import sys

from fairdiff_jax import cli


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "evaluate", "export"):
        assert name in out


def test_unknown_subcommand_is_refused(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fairdiff_jax.cli import main; sys.exit(main(['--help']))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "export" in result.stdout
