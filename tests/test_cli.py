"""The command line: version and help, through typer's runner and a real process."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import freezekit as fk
from freezekit.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"freezekit {fk.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "fine-tuning" in result.stdout


def test_unknown_option_is_a_usage_error_without_traceback():
    result = runner.invoke(app, ["--frobnicate"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_python_dash_m_runs_the_same_app():
    result = subprocess.run([sys.executable, "-m", "freezekit", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"freezekit {fk.__version__}"
