"""``python -m workbench launch``: N local processes that form one mesh, for trying multi-host runs.

    python -m workbench launch --processes 2 --host-devices 4 -- generate --mesh data=2,tensor=4 --prompt-ids 1,2,3

starts ``python -m workbench generate ...`` (or ``python script.py ...`` for a script given instead of a
command) N times on this machine, each with ``--host-devices``
simulated CPU devices, joined through a coordinator on a loopback port the launcher holds for
them (the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, which ``--coordinator``, ``--num-processes`` and ``--process-id`` would
otherwise give). The processes write to this terminal (only process 0 prints its output); the
launcher exits with their code. Each runs in a process group of its own, so the terminal's
Ctrl-C reaches only the launcher, which stops them all -- every group gets SIGTERM, then SIGKILL
after ``GRACE_S`` -- when one fails (exit: its code), after ``--timeout`` (124), and on SIGINT,
SIGTERM or SIGHUP (130, 143, 129), even when started with SIGINT ignored (``nohup``, CI runners).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from workbench.cli.common import CliError
from workbench.devices import xla_flags_with_device_count

GRACE_S = 5.0  # after SIGTERM, how long a process has to exit before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the launcher exits 128 + the signal's number


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
    group.add_argument(
        "--timeout",
        dest="join_timeout",
        type=float,
        default=None,
        metavar="S",
        help="how long to wait for every process to join the coordinator (default 60 s)",
    )


def join_processes(args: argparse.Namespace) -> None:
    """``workbench.distributed.initialize`` from the flags (or environment), when they ask for it."""
    if not hasattr(args, "coordinator"):
        return
    from workbench import distributed

    values = dict(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if not distributed.requested(**values):
        return
    timeout = distributed.JOIN_TIMEOUT_S if args.join_timeout is None else args.join_timeout
    try:
        distributed.initialize(**values, timeout=timeout)
    except distributed.JoinError as error:
        raise CliError(str(error)) from None
    except (ValueError, TypeError) as error:
        raise CliError(
            str(error)
            .replace("coordinator must", "--coordinator must")
            .replace("num_processes", "--num-processes")
            .replace("process_id", "--process-id")
            .replace("timeout must", "--timeout must")
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


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A TCP port for a coordinator, held until the block ends.

    The port is bound on every address (IPv6 and IPv4), as JAX's coordinator binds it, but not
    listened on; SO_REUSEADDR then lets the coordinator (gRPC sets it too) bind it as well,
    while the kernel gives it to no other bind and no outgoing connection. A port merely
    found free could be taken before process 0 binds it (by an outgoing connection's
    ephemeral port, or by another launcher).
    """
    holder = _bound_everywhere()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # after bind: chosen exclusively
        yield holder.getsockname()[1]
    finally:
        holder.close()


def _bound_everywhere() -> socket.socket:
    """A socket bound to a port the kernel picks, on every IPv6 and IPv4 address (or every
    IPv4 one, where IPv6 is off)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            return sock
        except OSError:
            sock.close()
            raise
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("0.0.0.0", 0))
        return sock


def process_env(process_id: int, processes: int, port: int, host_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(process_id)
    )
    if host_devices is not None:
        if host_devices < 1:
            raise CliError(f"--host-devices must be positive, got {host_devices}")
        env["XLA_FLAGS"] = xla_flags_with_device_count(env.get("XLA_FLAGS", ""), host_devices)
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
    grace: float = GRACE_S,
) -> int:
    """Run ``command`` as ``processes`` local processes joined on a loopback port held for them.

    Returns 0 when all exit 0; otherwise the code of the first to fail (a signal's number
    as 128 + n), after stopping the rest; 124 on ``timeout``; 128 + n on signal n of
    ``STOP_SIGNALS`` (its handlers are this function's while it runs, in the main thread).
    Every process runs in its own process group, so stopping one stops whatever it started too.
    """
    with _Signals() as signals, reserved_port() as port:
        children: list[subprocess.Popen] = []
        try:
            for process_id in range(processes):
                if signals.received is not None:  # before a child is up: start no more
                    break
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
                if signals.received is not None:
                    _report(f"{signal.Signals(signals.received).name} received; stopping every process")
                    return 128 + signals.received
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
        finally:
            seen = signals.count  # another signal while stopping skips the rest of the grace
            stop(children, grace, hurry=lambda: signals.count > seen)


class _Signals:
    """While active (in the main thread), SIGINT, SIGTERM and SIGHUP are only recorded: the
    launcher's loop acts on them, so no exception can land halfway through starting a process
    or reaping one. Handlers are set even where a signal was ignored (``nohup`` and some CI
    runners start programs with SIGINT ignored), and the previous ones come back on exit.
    The children, being exec'd, get the default handlers, not these."""

    def __init__(self):
        self.received: int | None = None
        self.count = 0
        self.previous: dict[int, object] = {}

    def _record(self, signum: int, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop(children: Sequence[subprocess.Popen], grace: float = GRACE_S, hurry: Callable[[], bool] = bool) -> None:
    """SIGTERM every process group, wait up to ``grace`` s for the processes to exit (less
    once ``hurry()`` says so), then SIGKILL every group and reap the processes."""
    _signal_groups(children, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(child.poll() is None for child in children) and time.monotonic() < end and not hurry():
        time.sleep(0.02)
    # Every group, not only those whose leader is alive: a member the leader started may be.
    _signal_groups(children, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)


def _signal_groups(children: Sequence[subprocess.Popen], sig: int) -> None:
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _report(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)
