"""Every command's --help works, and the top level stays light."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from tests.conftest import run_cli
from vcluster import __version__
from vcluster.cli.main import cli

HEAVY = ("pyetcd", "grpc", "pycdlib", "pyroute2", "qemu", "yaml", "google")


def all_commands(group: click.Group, ctx: click.Context,
                 prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        path = (*prefix, name)
        out.append(path)
        if isinstance(command, click.Group):
            out += all_commands(command, click.Context(command, parent=ctx), path)
    return out


COMMANDS = all_commands(cli, click.Context(cli))


def test_every_top_level_command_is_found() -> None:
    assert {p[0] for p in COMMANDS} >= {"template", "check", "image", "sandbox"}


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_subcommand_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {' '.join(path)}")
    # Every command explains itself in a sentence, not just its usage line.
    assert len(result.output.splitlines()) > 3


def test_top_level_help_and_version_as_a_process() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("template", "check", "image", "sandbox"):
        assert f"  {name} " in proc.stdout
    proc = run_cli("--version")
    assert proc.stdout.strip() == f"vcluster, version {__version__}"


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from vcluster.cli.main import cli\n"
        "try:\n    cli.main(['--help'], prog_name='vcluster')\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_is_a_usage_error() -> None:
    proc = run_cli("nosuch")
    assert proc.returncode == 2
    assert "No such command 'nosuch'" in proc.stderr
