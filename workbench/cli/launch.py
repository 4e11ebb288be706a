"""``python -m workbench launch``: N local processes that form one mesh, for trying multi-host runs.

    python -m workbench launch --processes 2 --host-devices 4 -- generate --mesh data=2,tensor=4 --prompt-ids 1,2,3

starts ``python -m workbench generate ...`` (or ``python script.py ...`` for a script given instead of a
command) N times on this machine, each with ``--host-devices``
simulated CPU devices, joined through a coordinator on a free loopback port (the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, which
``--coordinator``, ``--num-processes`` and ``--process-id`` would otherwise give). The processes
write to this terminal (only process 0 prints its output); the launcher exits with their code.
When one fails, or on Ctrl-C or ``--timeout``, it stops all of them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from workbench.cli.common import CliError

GRACE_S = 5.0  # after SIGTERM, how long a process has to exit before SIGKILL


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that join a command to other processes (one mesh over all their devices)."""
    group = parser.add_argument_group("more than one process (see `python -m workbench launch` to try it locally)")
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="process 0's address; default $JAX_COORDINATOR_ADDRESS or the cluster's",
    )
    group.add_argument("--num-processes", type=int, default=None, metavar="N")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")


def join_processes(args: argparse.Namespace) -> None:
    """``workbench.distributed.initialize`` from the flags (or environment), when they ask for it."""
    if not hasattr(args, "coordinator"):
        return
    from workbench import distributed

    values = dict(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if not distributed.requested(**values):
        return
    try:
        distributed.initialize(**values)
    except (ValueError, TypeError) as error:
        raise CliError(
            str(error)
            .replace("coordinator must", "--coordinator must")
            .replace("num_processes", "--num-processes")
            .replace("process_id", "--process-id")
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=2, metavar="N", help="local processes (default 2)")
    parser.add_argument(
        "--host-devices", type=int, default=None, metavar="D", help="simulated CPU devices per process (default: JAX's)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="stop every process after S seconds (exit 124)"
    )
    parser.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="a workbench command and its flags (generate ..., bench ...), or a script.py and its arguments",
    )


def run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError("give the command to launch after --, e.g. -- generate --prompt-ids 1,2,3")
    if command[0] == "launch":
        raise CliError("launch cannot launch itself")
    if args.processes < 1:
        raise CliError(f"--processes must be positive, got {args.processes}")
    # A workbench command runs as ``python -m workbench ...``; a script of yours as ``python script.py ...``.
    program = [sys.executable] if command[0].endswith(".py") else [sys.executable, "-m", "workbench"]
    return launch([*program, *command], processes=args.processes, host_devices=args.host_devices, timeout=args.timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(process_id: int, processes: int, port: int, host_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(process_id)
    )
    if host_devices is not None:
        if host_devices < 1:
            raise CliError(f"--host-devices must be positive, got {host_devices}")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={host_devices}".strip()
    return env


def launch(
    command: Sequence[str],
    *,
    processes: int,
    host_devices: int | None = None,
    timeout: float | None = None,
    stdout=None,
    stderr=None,
    poll_s: float = 0.05,
) -> int:
    """Run ``command`` as ``processes`` local processes joined on a free loopback port.

    Returns 0 when all exit 0; otherwise the code of the first to fail (a signal's number
    as 128 + n), after stopping the rest; 124 on ``timeout``; 130 on Ctrl-C. Every process
    runs in its own process group, so stopping one stops whatever it started too.
    """
    port = free_port()
    children: list[subprocess.Popen] = []
    try:
        for process_id in range(processes):
            children.append(
                subprocess.Popen(
                    list(command),
                    env=process_env(process_id, processes, port, host_devices),
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [child.poll() for child in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                process_id, code = failed[0]
                running = sum(code is None for code in codes)
                _report(
                    f"process {process_id} exited with {_describe(code)}"
                    + (f"; stopping the other {running}" if running else "")
                )
                return code if code > 0 else 128 - code
            if all(code == 0 for code in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                _report(f"timed out after {timeout:g} s; stopping every process")
                return 124
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _report("interrupted; stopping every process")
        return 130
    finally:
        stop(children)


def stop(children: Sequence[subprocess.Popen], grace: float = GRACE_S) -> None:
    """SIGTERM every process group still running, then SIGKILL what is left after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        alive = [child for child in children if child.poll() is None]
        for child in alive:
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        for child in alive:
            try:
                child.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for child in children:  # reap; and stray members of a group whose leader already exited
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _report(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)
