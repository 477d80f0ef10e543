"""sbatch's options, and reading options as getopt_long does, for ``vcluster batch``.

``vcluster batch`` passes sbatch's options through while it reads its own,
its DEFINITION and its SCRIPT.  To tell an option's value from the words
after it, one must know which options take a value: the table is SLURM
22.05's sbatch(1), and tests/test_batch.py checks that every option of the
installed ``sbatch --help`` is in it.  Reading follows getopt_long, as
sbatch does: ``-pdebug``, ``-p debug``, ``-Hv``, ``--partition=debug``,
``--partition debug``, a unique prefix of a long name (``--part=debug``);
the first word that is not an option (or ``--``) ends the options.  Every
option found is kept in its long form, ``--partition=debug``, for sbatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from vcluster.errors import InputError


class Takes(Enum):
    NOTHING = "no"
    VALUE = "yes"
    OPTIONAL = "opt"  # only as --name=value


@dataclass(frozen=True)
class Option:
    long: str
    short: str | None
    takes: Takes


@dataclass(frozen=True)
class Given:
    """One option as found: the option, its value, and the word(s) it was written as."""

    option: Option
    value: str | None
    written: str

    @property
    def sbatch_form(self) -> str:
        """``--long=value`` or ``--long``, what sbatch is given."""
        if self.value is None:
            return f"--{self.option.long}"
        return f"--{self.option.long}={self.value}"


class OptionError(InputError):
    """An option that is unknown, ambiguous, or lacks its value (the message says which)."""


def _table(text: str) -> tuple[Option, ...]:
    out = []
    for line in text.split("\n"):
        if line.strip():
            long, short, takes = line.split()
            out.append(Option(long, None if short == "-" else short, Takes(takes)))
    return tuple(out)


# long name, short letter (- for none), takes a value: yes, no, or opt(ional, only with =)
SBATCH_OPTIONS = _table("""
account A yes
acctg-freq - yes
array a yes
batch - yes
bb - yes
bbf - yes
begin b yes
chdir D yes
cluster-constraint - yes
clusters M yes
comment - yes
constraint C yes
container - yes
contiguous - no
core-spec S yes
cores-per-socket - yes
cpu-freq - yes
cpus-per-gpu - yes
cpus-per-task c yes
deadline - yes
delay-boot - yes
dependency d yes
distribution m yes
error e yes
exclude x yes
exclusive - opt
export - yes
export-file - yes
extra-node-info B yes
get-user-env - opt
gid - yes
gpu-bind - yes
gpu-freq - yes
gpus G yes
gpus-per-node - yes
gpus-per-socket - yes
gpus-per-task - yes
gres - yes
gres-flags - yes
help h no
hint - yes
hold H no
ignore-pbs - no
input i yes
job-name J yes
kill-on-invalid-dep - yes
licenses L yes
mail-type - yes
mail-user - yes
mcs-label - yes
mem - yes
mem-bind - yes
mem-per-cpu - yes
mem-per-gpu - yes
mincpus - yes
network - yes
nice - opt
no-kill k opt
no-requeue - no
nodefile F yes
nodelist w yes
nodes N yes
ntasks n yes
ntasks-per-core - yes
ntasks-per-gpu - yes
ntasks-per-node - yes
ntasks-per-socket - yes
open-mode - yes
output o yes
overcommit O no
oversubscribe s no
parsable - no
partition p yes
power - yes
prefer - yes
priority - yes
profile - yes
propagate - opt
qos q yes
quiet Q no
reboot - no
requeue - no
reservation - yes
signal - yes
sockets-per-node - yes
spread-job - no
switches - yes
test-only - no
thread-spec - yes
threads-per-core - yes
time t yes
time-min - yes
tmp - yes
uid - yes
usage - no
use-min-nodes - no
verbose v no
version V no
wait W no
wait-all-nodes - yes
wckey - yes
wrap - yes
""")


class OptionReader:
    """getopt_long over a set of options."""

    def __init__(self, options: Iterable[Option]) -> None:
        self.options = tuple(options)
        self.by_short = {o.short: o for o in self.options if o.short}
        self.by_long = {o.long: o for o in self.options}

    def long(self, name: str) -> Option:
        """The option called ``--name``, or the one whose name starts so (getopt_long)."""
        if name in self.by_long:
            return self.by_long[name]
        matches = sorted(n for n in self.by_long if n.startswith(name))
        if len(matches) == 1:
            return self.by_long[matches[0]]
        if matches:
            raise OptionError(f"--{name} is ambiguous (it could be --{', --'.join(matches)})")
        raise OptionError(f"--{name} is not an option of vcluster batch or sbatch")

    def read(self, words: Sequence[str]) -> tuple[list[Given], list[str]]:
        """The options at the start of ``words``, and the words after them."""
        given: list[Given] = []
        i = 0
        while i < len(words):
            word = words[i]
            if word == "--":
                return given, list(words[i + 1:])
            if word.startswith("--"):
                name, eq, value = word[2:].partition("=")
                option = self.long(name)
                if option.takes is Takes.NOTHING and eq:
                    raise OptionError(f"{word}: --{option.long} takes no value")
                if option.takes is Takes.VALUE and not eq:
                    if i + 1 == len(words):
                        raise OptionError(f"{word}: --{option.long} needs a value")
                    i += 1
                    value, word = words[i], f"{word} {words[i]}"
                given.append(Given(option, value if eq or option.takes is Takes.VALUE
                                   else None, word))
            elif word.startswith("-") and word != "-":
                letters = word[1:]
                while letters:
                    letter, letters = letters[0], letters[1:]
                    short = self.by_short.get(letter)
                    if short is None:
                        raise OptionError(f"-{letter} is not an option of vcluster batch or "
                                          "sbatch")
                    if short.takes is not Takes.VALUE:
                        given.append(Given(short, None, f"-{letter}"))
                        continue
                    if not letters:
                        if i + 1 == len(words):
                            raise OptionError(f"-{letter} needs a value")
                        i += 1
                        letters = words[i]
                    given.append(Given(short, letters, f"-{letter} {letters}"))
                    letters = ""
            else:
                return given, list(words[i:])
            i += 1
        return given, []
