"""``vcluster template list|show`` and ``vcluster check``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vcluster.cli.common import load_config, print_table

if TYPE_CHECKING:
    from vcluster.config.loader import Config
    from vcluster.config.templates import Template


@click.group()
def template() -> None:
    """List and inspect VM templates."""


@template.command("list")
def list_templates() -> None:
    """List the templates you can use, with their image and description."""
    config = load_config()
    rows = [
        (t.name, str(t.image or t.kernel or "-"), t.resource_set or "default",
         t.level, t.description)
        for t in config.templates.values()
    ]
    if not rows:
        click.echo("no templates defined (see templates.yaml in "
                   "/etc/vcluster or ~/.vcluster)", err=True)
        return
    print_table(("NAME", "IMAGE", "RESOURCES", "LEVEL", "DESCRIPTION"), rows)


def describe_fields(t: Template) -> list[tuple[str, str, str]]:
    """(key, value, origin) for every field of a resolved template."""
    from vcluster.config.resolve import ATTRIBUTES
    from vcluster.schema.fields import format_size

    def show(key: str, value: object) -> str:
        if value is None or value == ():
            return {"vcpus": "(SLURM's --cpus-per-task)",
                    "cpu-model": "(by accelerator: host on KVM, qemu64 on TCG)",
                    "resource-set": "(default)"}.get(key, "-")
        if key == "memory" and isinstance(value, int):
            return format_size(value)
        if key == "fam":
            size = getattr(value, "size", None)
            return (f"size={format_size(size) if size else '(resource set default)'} "
                    f"name={getattr(value, 'name', '')}")
        if key == "disks" and isinstance(value, tuple):
            return ", ".join(f"{d.name}={format_size(d.size)}{' shared' if d.shared else ''}"
                             for d in value)
        if key == "qemu-args" and isinstance(value, tuple):
            import shlex

            return shlex.join(value)
        if key == "inherits" and isinstance(value, tuple):
            return " -> ".join(value)
        return str(value)

    rows = []
    for key in ("inherits", *ATTRIBUTES):
        attr = ATTRIBUTES.get(key, key)
        origin = t.origins.get(key)
        rows.append((key, show(key, getattr(t, attr)), str(origin) if origin else "default"))
    return rows


@template.command("show")
@click.argument("name")
def show_template(name: str) -> None:
    """Show template NAME resolved through its inherits chain, with the file and
    line each value came from ("default" where vcluster's default applies)."""
    from vcluster.errors import InputError

    config = load_config()
    t = config.templates.get(name)
    if t is None:
        known = ", ".join(config.templates) or "none are defined"
        raise InputError(f"template {name!r}: no such template (expected one of: {known})")
    click.echo(f"template {t.name} ({t.level}, defined at {t.origin})")
    print_table(("KEY", "VALUE", "FROM"), describe_fields(t))


@click.command()
@click.argument("definition", required=False)
def check(definition: str | None) -> None:
    """Check the configuration files and, if given, a cluster DEFINITION such as
    debian:4,tiny:2, without submitting anything. Prints what was read, and the
    VMs the definition expands to; exits 2 on the first error."""
    from vcluster.definition import expand_definition

    config = load_config()
    vms = expand_definition(definition, config.templates) if definition is not None else []
    for path in config.files:
        click.echo(f"ok  {path}")
    click.echo(f"{len(config.templates)} templates, {len(config.resource_sets)} resource sets, "
               f"{len(config.networks)} networks")
    validated = _validate_user_data(config)
    if validated:
        click.echo(validated)
    for vm in vms:
        click.echo(f"{vm.name}  {vm.template}")


def _validate_user_data(config: Config) -> str | None:
    """Check every template's cloud-config with ``cloud-init schema``, when it is here.

    One line saying what was done (None: no template has user-data); an
    InputError naming the template and its user-data for the first that fails.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from vcluster.cluster import user_data_text
    from vcluster.errors import InputError
    from vcluster.run import run

    texts = {name: text for name, t in config.templates.items()
             if (text := user_data_text(t)) is not None and text.startswith("#cloud-config")}
    if not texts:
        return None
    if shutil.which("cloud-init") is None:
        return (f"user-data of {len(texts)} templates read as YAML only (cloud-init is not "
                "installed here: its schema check is skipped)")
    with tempfile.TemporaryDirectory(prefix="vcluster-check-") as tmp:
        for name, text in texts.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(text)
            result = run(["cloud-init", "schema", "--config-file", str(path)], check=False,
                         timeout=60)
            if result.returncode != 0:
                said = " ".join(str(result.stderr or result.stdout).split())
                where = config.templates[name].user_data
                raise InputError(f"template {name!r}: user-data {where}: cloud-init schema: "
                                 f"{said}")
    return f"user-data of {len(texts)} templates valid (cloud-init schema)"
