"""``vcluster-agent``: the host agent daemon, and the commands the SLURM scripts run.

::

    vcluster-agent [--config DIR] [serve] [--node NAME | --login-node]
                   [--reconcile-interval S] [--no-register]
    vcluster-agent [--config DIR] prolog JOB     # the SLURM prolog (root)
    vcluster-agent [--config DIR] release JOB [--user NAME]
                                                 # the SLURM epilog (root); idempotent
    vcluster-agent [--config DIR] status         # jobs and their resources (root)
    vcluster-agent [--config DIR] ping

``DIR`` holds batch.yaml (default: $VCLUSTER_CONF or /etc/vcluster), and the
site policy the agent enforces, networks.yaml and resources.yaml
(``policy.py``); the socket is ``<directories.run>/agent.sock``.

``serve`` checks at start-up that SLURM knows the node name (``--node``,
default the short hostname) and refuses to start otherwise: the reconcile
pass asks SLURM by that name.  A host that runs no SLURM jobs (a login node:
it serves credentials, and the VXLAN ids of the jobs' private networks to
their launchers) says ``--login-node``: no check, no reconcile pass, no
registration.  ``release --user``
names the job's user (the epilog passes SLURM_JOB_USER), so its cluster
keys go even when this host has no undo log of the job.  Deliberately argparse, not the
click CLI: the agent stays small and quick to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from vcluster import codec
from vcluster.agent.client import AgentClient, AgentError
from vcluster.agent.protocol import StatusAnswer
from vcluster.config.batch import BatchConfig, parse_batch
from vcluster.config.paths import system_dir
from vcluster.errors import VclusterError
from vcluster.identity import host_name
from vcluster.schema.source import load_yaml

log = logging.getLogger("vcluster.agent")


def load_config(directory: Path | None) -> BatchConfig:
    path = (directory or system_dir()) / "batch.yaml"
    return parse_batch(load_yaml(path), path)


def serve(config: BatchConfig, directory: Path, node: str | None, interval: float,
          register: bool, login: bool) -> int:
    from vcluster.agent.firewall import Nftables
    from vcluster.agent.jobs import Jobs, Settings
    from vcluster.agent.netdev import Netlink
    from vcluster.agent.peer import Slurm
    from vcluster.agent.policy import load_policy
    from vcluster.agent.reconcile import Reconciler
    from vcluster.agent.registration import Registration, StoreLink
    from vcluster.agent.server import AgentServer
    from vcluster.agent.service import Agent

    if os.geteuid() != 0:
        raise VclusterError("vcluster-agent serve needs root (it makes network devices and "
                            "files owned by other users)")
    if login and node is not None:
        raise VclusterError("--login-node and --node exclude each other")
    node = node or host_name()
    policy = load_policy(directory)
    slurm = Slurm(node)
    if not login:
        slurm.check_node()
    layout = config.directories.layout
    for directory in (layout.state, layout.run):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    settings = Settings(node=node, layout=layout)
    link = StoreLink(config.store)
    devices = Netlink()
    jobs = Jobs(settings, link, policy, devices, Nftables())
    registration = None
    if register and not login:
        registration = Registration(link, node, interfaces=policy.underlay_interfaces(),
                                    local_ipv4=devices.interface_ipv4)
    agent = Agent(jobs, slurm, link, registration)
    try:
        server = AgentServer(layout.agent_socket, agent)
    except OSError as e:
        raise VclusterError(f"cannot serve on {layout.agent_socket}: {e}") from e
    reconciler = Reconciler(jobs, slurm, interval)

    def stop(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("vcluster agent of %s (pid %d) serving on %s; state in %s; %s", node, os.getpid(),
             server.path, layout.state,
             "a login node (credentials and VXLAN ids): no reconcile pass" if login else
             f"reconcile every {interval:g} s")
    if registration is not None:
        registration.start()
    if not login:
        reconciler.start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if not login:
            reconciler.stop()
        if registration is not None:
            registration.stop()
        link.close()
    log.info("stopped; the jobs' resources stay until released")
    return 0


def _client(config: BatchConfig) -> AgentClient:
    return AgentClient(config.directories.layout.agent_socket)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vcluster-agent", description=(
        "The vcluster host agent (root): network devices, FAM regions and store credentials "
        "for the virtual clusters of the SLURM jobs on this host."))
    top.add_argument("--config", type=Path, metavar="DIR",
                     help="directory holding batch.yaml (default: $VCLUSTER_CONF or "
                          "/etc/vcluster)")
    top.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the agent (the default)")
    s.add_argument("--node", help="this host's SLURM node name (default: the short hostname); "
                   "SLURM must know it")
    s.add_argument("--login-node", dest="login", action="store_true",
                   help="this host runs no SLURM jobs (a login node): serve credentials and "
                        "VXLAN ids, no reconcile pass, no registration")
    s.add_argument("--reconcile-interval", type=float, default=60.0, metavar="SECONDS",
                   help="how often to release resources of jobs SLURM no longer runs "
                        "(default: 60)")
    s.add_argument("--no-register", dest="register", action="store_false",
                   help="do not register this host in the store")
    for name, text in (("prolog", "set up a job on this host (the SLURM prolog runs it)"),
                       ("release", "remove everything of a job on this host (the epilog)")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job", metavar="JOB", help="the SLURM job id")
        if name == "release":
            c.add_argument("--user", metavar="NAME",
                           help="the job's user (SLURM_JOB_USER): delete its cluster keys of "
                                "the job even if this host has no undo log of it")
    st = sub.add_parser("status", help="show the jobs on this host and their resources")
    st.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    sub.add_parser("ping", help="check that the agent answers")
    return top


def _print_status(answer: StatusAnswer) -> None:
    print(f"host {answer.host} (node {answer.node}), registered in the store: "
          f"{'yes' if answer.registered else 'no'}")
    if not answer.jobs:
        print("no jobs")
        return
    for job in answer.jobs:
        if job.log is None:
            print(f"job {job.job}: {job.error}")
            continue
        print(f"job {job.job} of {job.log.user} (uid {job.log.uid}):")
        for entry in job.log.entries:
            where = "".join(f" {k}={v}" for k, v in (("vm", entry.vm),
                                                     ("network", entry.network),
                                                     ("vni", entry.vni))
                            if v is not None)
            print(f"  {entry.kind:<7} {entry.name}{where}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    command = args.command or "serve"
    try:
        config = load_config(args.config)
        if command == "serve":
            return serve(config, args.config or system_dir(), getattr(args, "node", None),
                         getattr(args, "reconcile_interval", 60.0),
                         getattr(args, "register", True), getattr(args, "login", False))
        client = _client(config)
        if command == "ping":
            print(codec.to_json(client.ping()))
        elif command == "prolog":
            answer = client.prolog(args.job)
            print(f"job {args.job} set up on {socket.gethostname()}"
                  + ("" if answer.published else " (not yet recorded in the store)"))
        elif command == "release":
            removed = client.release(args.job, args.user).removed
            print(f"job {args.job} released on {socket.gethostname()}: "
                  + (", ".join(removed) or "nothing to remove"))
        elif command == "status":
            status = client.status()
            if args.json:
                print(codec.to_json(status, indent=1), end="")
            else:
                _print_status(status)
    except AgentError as e:
        print(f"vcluster-agent: {e}", file=sys.stderr)
        return 1
    except VclusterError as e:
        print(f"vcluster-agent: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
