"""``vcluster batch``: a virtual cluster as an unattended SLURM batch job."""

from __future__ import annotations

import click

from vcluster.launch.batchargs import OWN, OWN_HELP

HELP = """Submit a virtual cluster as a batch job: boot it, run SCRIPT, stop it.

\b
  vcluster batch [OPTIONS] [DEFINITION] SCRIPT [ARGS...]
  vcluster batch [OPTIONS] -E FILE | -b FILE [DEFINITION [ARGS...]]

The script carries its options at the top, as for sbatch: #SBATCH lines go
to sbatch, #VCLUSTER lines give vcluster batch's options and the
DEFINITION; the command line wins over both. Every option that is not
vcluster's is sbatch's (-p PARTITION, -t TIME, -N NODES, -o FILE, -J NAME,
-H, --wait, --parsable, ...); each VM is one SLURM task with -c CPUs.

\b
  #!/bin/sh
  #SBATCH -t 30 -p debug
  #VCLUSTER -c 2 tiny-fam:4
  vcluster exec --all -- hostname

In the job, the cluster boots as with vcluster alloc (placement, networks,
FAM, progress lines in the job's output), then SCRIPT runs on the job's
first host with VCLUSTER_JOB_ID set (or, with -b, in vm0); when it ends the
cluster is stopped and the job exits with its status (--wait returns it;
sacct and scontrol show it). A VM that fails to boot ends the job with
status 1, its reason and its console's last lines in the output.

Everything is checked before sbatch is run: the definition, templates,
images, networks and every directive (a bad one is one line naming the
script, its line and the directive; exit 2, nothing submitted). vcluster ps
lists batch clusters, pending ones too; scancel ends one and leaves nothing.

On the local backend (batch.backend: local, the embedded default when there
is no /etc/vcluster) the job runs on this machine, in the background: its
output goes to vcluster-%j.out; of sbatch's options only -o, -e, -J, -D, -c,
--wait and --comment are taken.

\b
Examples:
  vcluster batch job.sh
  vcluster batch -t 60 -o run-%j.log debian:4 ./run-tests.sh --quick
  vcluster batch -b inside.sh --wait debian:2
"""


def _options_help() -> str:
    """vcluster batch's own options, laid out as click lays out options."""
    import textwrap

    lines = ["", "", "\b", "vcluster's options (the others are sbatch's):"]
    for option in OWN:
        metavar, text = OWN_HELP[option.long]
        short = f"-{option.short}, " if option.short else "    "
        name = f"  {short}--{option.long} {metavar}"
        lines += textwrap.wrap(text, 76, initial_indent=f"{name:31}",
                               subsequent_indent=" " * 31)
    return "\n".join(lines)


@click.command(help=HELP + _options_help(), add_help_option=True,
               context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False,
                                 "help_option_names": ["--help"]})
@click.argument("words", nargs=-1, type=click.UNPROCESSED,
                metavar="[DEFINITION] SCRIPT [ARGS...]")
def batch(words: tuple[str, ...]) -> None:
    from vcluster.cli.common import load_config
    from vcluster.launch.batch import prepare_batch, submit_batch

    request, job = prepare_batch(list(words))
    if load_config().batch.local:
        from vcluster.local.batch import submit_local_batch

        raise SystemExit(submit_local_batch(request, job))
    raise SystemExit(submit_batch(request, job))
