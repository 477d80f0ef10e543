"""The exception tree: every failure vcluster reports is a VclusterError.

Library code raises these and never exits; only the CLI turns them into a
one-line message and an exit code (2 for bad input, 1 for everything else).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class VclusterError(Exception):
    """Base of every error vcluster reports; ``str()`` is the one-line message."""

    exit_code = 1


class InputError(VclusterError):
    """Bad input from the user: configuration, arguments, definitions."""

    exit_code = 2


@dataclass(frozen=True)
class Origin:
    """Where a configuration value came from."""

    file: Path
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class ConfigError(InputError):
    """A configuration file is wrong; the message names file, line and key."""

    def __init__(self, origin: Origin | None, key: str, problem: str, expected: str = "") -> None:
        self.origin = origin
        self.key = key
        self.problem = problem
        self.expected = expected
        where = f"{origin}: " if origin else ""
        what = f"{key}: " if key else ""
        tail = f" (expected {expected})" if expected else ""
        super().__init__(f"{where}{what}{problem}{tail}")


class DefinitionError(InputError):
    """A cluster definition (``tpl:N[,tpl2:M]``) is wrong."""

    SYNTAX = "TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], for example debian:4,tiny:2"

    def __init__(self, definition: str, problem: str, expected: str = SYNTAX) -> None:
        self.definition = definition
        self.problem = problem
        super().__init__(f"cluster definition {definition!r}: {problem} (expected {expected})")


class CommandError(VclusterError):
    """An external command could not run or failed."""

    def __init__(self, argv: list[str], message: str, stderr: str = "") -> None:
        self.argv = argv
        self.stderr = stderr
        super().__init__(message)


class StoreError(VclusterError):
    """The state store (etcd) failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached."""


class StorePermissionDenied(StoreError):
    """The store refused the request for lack of permission."""


class ResourceError(VclusterError):
    """A job's device, FAM region, directory or undo log on a host could not be made or used."""


class TunnelError(ResourceError):
    """A job's private network cannot be joined to its other hosts here (VXLAN, underlay,
    source filter); the message names the host and the reason."""


class CredentialsError(VclusterError):
    """Store credentials for a local user could not be issued."""


class ImageError(VclusterError):
    """An image could not be found, built or used."""


class SeedError(VclusterError):
    """A cloud-init seed could not be written."""


class VmError(VclusterError):
    """A VM could not be prepared, started or kept running; ``str()`` is its one-line reason."""


class SandboxError(VclusterError):
    """The sandbox test bed could not be brought up, used or torn down."""
