"""What ``vcluster batch`` is asked for: its command line and its script's directives, merged.

The script carries its options at the top, as sbatch reads them: after the
``#!`` line, ``#SBATCH`` and ``#VCLUSTER`` lines, blank lines and comments,
up to the first other line.  ``#SBATCH`` lines are sbatch's (copied into the
job script, where sbatch reads them itself); ``#VCLUSTER`` lines are the
words of a ``vcluster batch`` command line (its options, sbatch's, and the
DEFINITION).  The command line wins over ``#VCLUSTER`` lines, which win over
``#SBATCH`` lines.  Every problem is one ``InputError`` naming the argument,
or the script, its line and the directive.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vcluster.errors import InputError
from vcluster.launch.sbatchopts import SBATCH_OPTIONS, Given, Option, OptionReader, Takes

TAGS = ("#SBATCH", "#VCLUSTER")

# vcluster batch's own options; -c is the VMs' CPUs, and goes to sbatch too.
OWN = (
    Option("cpus-per-task", "c", Takes.VALUE),
    Option("host-script", "E", Takes.VALUE),
    Option("vm-script", "b", Takes.VALUE),
    Option("stop-timeout", None, Takes.VALUE),
    Option("ready-timeout", None, Takes.VALUE),
)
OWN_HELP = {
    "cpus-per-task": ("N", "CPUs per VM (each VM is one SLURM task; its vCPUs unless the "
                           "template sets vcpus)."),
    "host-script": ("FILE", "The script to run on the job's first host once the cluster is "
                            "ready (the same as giving it as SCRIPT)."),
    "vm-script": ("FILE", "Copy FILE into vm0 and run it there (as root, through the guest "
                          "agent) instead of on a host."),
    "stop-timeout": ("SECONDS", "Seconds each guest gets to power down at the end (default: "
                                "20 for cloud-init images, 1 for tiny)."),
    "ready-timeout": ("SECONDS", "Seconds the whole cluster gets to become ready "
                                 "(default: 600)."),
}
READY_TIMEOUT = 600.0
# sbatch's options that a batch cluster cannot honour, and what to do instead.
REFUSED = {
    "ntasks": "the job has one task per VM, vcluster asks for them: give the VMs' CPUs with "
              "-c and the hosts with -N",
    "wrap": "give a SCRIPT (or -E FILE): vcluster runs it once the cluster is ready",
    "array": "a batch cluster is one job: submit several clusters with several "
             "vcluster batch commands",
}
_SHADOWED_SHORT = {o.short for o in OWN}
READER = OptionReader([*OWN, *(
    o if o.short not in _SHADOWED_SHORT else Option(o.long, None, o.takes)
    for o in SBATCH_OPTIONS if o.long not in {x.long for x in OWN})])
SBATCH_READER = OptionReader(SBATCH_OPTIONS)


@dataclass(frozen=True)
class Directive:
    """One ``#SBATCH`` or ``#VCLUSTER`` line of a script."""

    path: Path
    line: int
    tag: str
    text: str  # the whole line, as written
    words: tuple[str, ...]

    @property
    def where(self) -> str:
        """``job.sh:3: #VCLUSTER -c 2 tiny:2``: what an error about it starts with."""
        return f"{self.path}:{self.line}: {self.text.strip()}"


@dataclass(frozen=True)
class BatchRequest:
    """Everything vcluster batch was asked for, checked and merged."""

    script: Path
    text: str  # the script, read once at submission (as sbatch keeps its copy)
    in_vm: bool  # -b: the script runs in vm0
    args: tuple[str, ...]
    definition: str
    definition_from: Directive | None  # None: the command line
    cpus: int | None
    stop_timeout: float | None
    ready_timeout: float
    sbatch_from: tuple[tuple[Directive | None, tuple[str, ...]], ...]  # sbatch's options, long
    # form, by where they were given: each #VCLUSTER line's, then the command line's (None)
    sbatch_lines: tuple[Directive, ...]  # the #SBATCH lines, copied into the job script
    job_name: str | None  # -J, from wherever it was given
    comment: str | None  # --comment, from wherever it was given

    @property
    def sbatch(self) -> tuple[str, ...]:
        """sbatch's options for its command line, the command line's last (they win)."""
        return tuple(o for _, options in self.sbatch_from for o in options)


def read_directives(path: Path, text: str) -> list[Directive]:
    """The directives at the top of a script; InputError if it has no ``#!`` line."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise InputError(f"{path}:1: a batch script starts with #! and its interpreter, such as "
                         "#!/bin/sh (as sbatch asks)")
    found = []
    for number, line in enumerate(lines[1:], start=2):
        tag = next((t for t in TAGS if line.startswith(t)
                    and (len(line) == len(t) or line[len(t)].isspace())), None)
        if tag is not None:
            try:
                words = shlex.split(line[len(tag):], comments=True)
            except ValueError as e:
                raise InputError(f"{path}:{number}: {line.strip()}: {e}") from e
            found.append(Directive(path, number, tag, line, tuple(words)))
        elif line.strip() and not line.lstrip().startswith("#"):
            break  # the first command: no directive after it counts
    return found


def _read(reader: OptionReader, words: Sequence[str], where: str) -> tuple[list[Given],
                                                                          list[str]]:
    from vcluster.launch.sbatchopts import OptionError

    try:
        given, rest = reader.read(words)
    except OptionError as e:
        raise InputError(f"{where}{e} (see vcluster batch --help)") from e
    for g in given:
        if g.option.long in REFUSED:
            raise InputError(f"{where}{g.written}: not for a batch cluster: "
                             f"{REFUSED[g.option.long]}")
    return given, rest


def sbatch_given(d: Directive) -> list[Given]:
    """The sbatch options of an ``#SBATCH`` line (read once already: they are valid)."""
    return _read(SBATCH_READER, d.words, f"{d.where}: ")[0]


def sbatch_of_sources(request: BatchRequest) -> list[tuple[str, Given]]:
    """Every sbatch option of the request, with where it was given (a directive's line, or
    "the command line"), in the order they apply."""
    out = [(d.where, g) for d in request.sbatch_lines for g in sbatch_given(d)]
    for where, options in request.sbatch_from:
        for g in _read(SBATCH_READER, options, "")[0]:
            out.append((where.where if where is not None else "the command line", g))
    return out


def _number(g: Given, where: str, minimum: float, what: str) -> float:
    try:
        value = float(g.value or "")
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # also NaN
        raise InputError(f"{where}{g.written}: {g.value!r} is not {what}")
    return value


def _cpus(g: Given, where: str) -> int:
    if not (g.value or "").isdigit() or int(g.value or "0") < 1:
        raise InputError(f"{where}{g.written}: {g.value!r} is not a number of CPUs, at least 1")
    return int(g.value or "0")


@dataclass
class _Merged:
    """Options as they are merged, lowest precedence first."""

    own: dict[str, tuple[Given, str]]
    sbatch: list[Given]

    def take(self, given: list[Given], where: str) -> None:
        for g in given:
            if g.option in OWN:
                self.own[g.option.long] = (g, where)
                if g.option.long == "cpus-per-task":
                    _cpus(g, where)
            else:
                self.sbatch.append(g)

    def last(self, long: str) -> str | None:
        values = [g.value for g in self.sbatch if g.option.long == long]
        return values[-1] if values else None


def _split_positionals(rest: list[str], script_option: str | None,
                       ) -> tuple[str | None, str | None, list[str]]:
    """(DEFINITION, SCRIPT, ARGS) from the words after the options."""
    if script_option is not None:  # -E/-b FILE [DEFINITION [ARGS...]]
        return (rest[0] if rest else None), script_option, rest[1:]
    if not rest:
        raise InputError("missing SCRIPT: the batch script to run (expected vcluster batch "
                         "[OPTIONS] [DEFINITION] SCRIPT [ARGS...], or -E FILE or -b FILE)")
    if os.path.isfile(rest[0]):
        return None, rest[0], rest[1:]
    if len(rest) == 1:
        raise InputError(f"missing SCRIPT after DEFINITION {rest[0]!r} (if {rest[0]} is your "
                         "script: there is no such file)")
    return rest[0], rest[1], rest[2:]


def _sbatch_forms(given: list[Given]) -> tuple[str, ...]:
    """sbatch's options among ``given``, in the long form sbatch is given."""
    return tuple(g.sbatch_form for g in given if g.option not in OWN)


def read_request(words: Sequence[str]) -> BatchRequest:
    """The command line's words (after ``vcluster batch``) and the script's directives."""
    given, rest = _read(READER, words, "")
    cli = _Merged({}, [])
    cli.take(given, "")
    host, vm = cli.own.get("host-script"), cli.own.get("vm-script")
    if host and vm:
        raise InputError("-E and -b: give one script, to run on the host (-E) or in vm0 (-b)")
    chosen = host or vm
    definition, script_name, args = _split_positionals(
        rest, chosen[0].value if chosen else None)
    assert script_name is not None
    script = Path(script_name)
    try:
        text = script.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a text file"
        raise InputError(f"SCRIPT {script}: cannot read: {reason}") from e
    directives = read_directives(script, text)
    merged = _Merged({}, [])
    sources: list[tuple[Directive | None, tuple[str, ...]]] = []
    lines_definition: Directive | None = None
    sbatch_lines: list[Directive] = []
    for d in directives:
        where = f"{d.where}: "
        if d.tag == "#SBATCH":
            found, extra = _read(SBATCH_READER, d.words, where)
            if extra:
                raise InputError(f"{where}{extra[0]!r} is not an option (sbatch would refuse it)")
            sbatch_lines.append(d)
            for g in found:  # -c in #SBATCH: the VMs' CPUs too, unless said elsewhere
                if g.option.long == "cpus-per-task":
                    merged.take([Given(OWN[0], g.value, g.written)], where)
            continue
        found, extra = _read(READER, d.words, where)
        for g in found:
            if g.option.long in ("host-script", "vm-script"):
                raise InputError(f"{where}{g.written}: give the script to run on the command "
                                 "line, not in a directive")
        merged.take(found, where)
        sources.append((d, _sbatch_forms(found)))
        if len(extra) > 1:
            raise InputError(f"{where}one DEFINITION per line, not {' '.join(extra)!r}")
        if extra:
            if lines_definition is not None:
                raise InputError(f"{where}a second DEFINITION (the first is on line "
                                 f"{lines_definition.line})")
            lines_definition = d
    from_line = lines_definition if definition is None else None
    if definition is None:
        if lines_definition is None:
            raise InputError(f"{script}: no DEFINITION: give one on the command line or in a "
                             "'#VCLUSTER DEFINITION' line at the top of the script, such as "
                             "#VCLUSTER tiny:2")
        definition = _read(READER, lines_definition.words, "")[1][0]
    sbatch_only = _Merged({}, [])
    for d in sbatch_lines:
        sbatch_only.sbatch += _read(SBATCH_READER, d.words, "")[0]
    merged.own.update(cli.own)  # the command line wins
    merged.sbatch += cli.sbatch
    sources.append((None, _sbatch_forms(given)))
    everything = _Merged({}, sbatch_only.sbatch + merged.sbatch)

    def own(long: str, minimum: float, what: str) -> float | None:
        if long not in merged.own:
            return None
        g, where = merged.own[long]
        return _number(g, where, minimum, what)

    cpus = _cpus(*merged.own["cpus-per-task"]) if "cpus-per-task" in merged.own else None
    ready = own("ready-timeout", 1, "a number of seconds, at least 1")
    return BatchRequest(
        script=script, text=text, in_vm=vm is not None, args=tuple(args),
        definition=definition, definition_from=from_line,
        cpus=cpus,
        stop_timeout=own("stop-timeout", 0, "a number of seconds"),
        ready_timeout=READY_TIMEOUT if ready is None else ready,
        sbatch_from=tuple((d, options) for d, options in sources if options),
        sbatch_lines=tuple(sbatch_lines),
        job_name=everything.last("job-name"), comment=everything.last("comment"))
