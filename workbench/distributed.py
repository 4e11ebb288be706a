"""More than one process: one mesh over the devices of every process (JAX's multi-controller runtime).

Every process runs the same program over its own (addressable) devices, and ``jax.devices()``
lists the devices of all of them, so ``make_mesh`` and the rules table span processes unchanged.
The engine's host-side steps need nothing more: prompts, seeds and keys enter identically on
every process, the jitted bodies return their results replicated (each process reads its own
copy), and the scheduler therefore makes the same decisions everywhere. What does differ:

- start-up: :func:`initialize` (before anything touches a device), once per process;
- output: only process 0 prints (:func:`main_process_output`);
- reading a sharded array on the host: :func:`host_value` (a collective: every process calls it).

    workbench.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
    engine, params = workbench.load(mesh={"data": 2, "tensor": 4})   # 8 devices, 4 per process

Locally, ``python -m workbench launch --processes 2 --host-devices 4 -- generate ...`` starts
the processes and sets the environment variables :func:`initialize` reads.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import jax
import numpy as np

from workbench.checks import check_int

# The variables JAX itself reads (JAX_COORDINATOR_ADDRESS) or that the launcher sets for it.
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# How long a process waits for a silent peer before failing (JAX's default is 100 s): a peer
# that died mid-run ends the others in about this long instead of leaving them hanging.
HEARTBEAT_TIMEOUT_S = 20
# How long :func:`initialize` waits for every process to join (JAX's own default is 300 s).
JOIN_TIMEOUT_S = 60.0


class JoinError(RuntimeError):
    """This process could not join the others (say, the coordinator's port is taken)."""


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def requested(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Whether arguments or the environment ask for more than one process."""
    given = (coordinator, num_processes, process_id)
    return any(v is not None for v in given) or any(
        os.environ.get(name) for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = JOIN_TIMEOUT_S,
) -> None:
    """Join this process to the others: ``coordinator`` is process 0's ``HOST:PORT``.

    Values not given come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; any still missing are left to JAX's cluster detection (SLURM, Open MPI,
    Cloud TPU pods, ...). On CPU the collectives between processes run over gloo (TCP).
    Must run before JAX starts its backend; calling it again with the same values does nothing.

    When not every process has joined after ``timeout`` seconds (the coordinator unreachable,
    a process never started), this process prints one ``error:`` line naming the coordinator
    and exits with code 1: JAX's runtime, left to its own timeout, would abort it with a stack
    trace instead, and it cannot be interrupted while it waits. A coordinator port in use
    raises :class:`JoinError`.
    """
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    num_processes = _env_int(NUM_PROCESSES_ENV) if num_processes is None else num_processes
    process_id = _env_int(PROCESS_ID_ENV) if process_id is None else process_id
    if coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
        raise ValueError(f"coordinator must be HOST:PORT (say 127.0.0.1:1234), got {coordinator!r}")
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        if value is not None:
            check_int(name, value)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be positive, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"process_id must not be negative, got {process_id}")
    if process_id is not None and num_processes is not None and process_id >= num_processes:
        raise ValueError(f"process_id must be in 0..{num_processes - 1}, got {process_id}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if is_initialized():
        if process_id is not None and process_id != jax.process_index():
            raise ValueError(f"already initialized as process {jax.process_index()}, not {process_id}")
        return
    # Harmless off CPU; on CPU, without it a computation over another process's devices fails.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"the coordinator at {coordinator}" if coordinator else "the coordinator"
    if process_id == 0:
        waiting = f"process 0 ({where}) waited {timeout:g} s for all {num_processes} processes to join"
    else:
        who = "this process" if process_id is None else f"process {process_id}"
        waiting = f"{who} could not join {where} within {timeout:g} s (is process 0 running there?)"
    if process_id == 0 and coordinator is not None and not _port_free(int(coordinator.rsplit(":", 1)[1])):
        raise JoinError(_port_taken(coordinator))
    watchdog = threading.Timer(timeout, leave, args=(1, f"{waiting}; --timeout sets how long to wait"))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=None if num_processes is None else int(num_processes),
            process_id=None if process_id is None else int(process_id),
            # later than the watchdog, which ends the process with one line instead of an abort
            initialization_timeout=math.ceil(timeout) + 60,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    except RuntimeError as error:
        if "Failed to start RPC server" not in str(error):
            raise
        raise JoinError(_port_taken(coordinator)) from None
    finally:
        watchdog.cancel()


def _port_free(port: int) -> bool:
    """Whether the coordinator could listen on ``port``, bound as JAX binds it (``[::]:port``,
    with SO_REUSEADDR as gRPC sets it): asked first, so that a port in use is one line, not
    gRPC's log and an exception. A custom ``JAX_COORDINATOR_BIND_ADDRESS`` is not checked."""
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return True
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 here: left to JAX
        return True
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind(("::", port))
            probe.listen()
        except OSError as error:
            return error.errno != errno.EADDRINUSE  # anything else (IPv6 off, say) is left to JAX
    return True


def _port_taken(coordinator: str | None) -> str:
    port = (coordinator or "").rsplit(":", 1)[-1]
    return f"process 0 could not start the coordinator on port {port}: is the port in use?"


def failure_line(error: BaseException) -> str | None:
    """One line for a runtime error of a run over several processes -- a collective whose peer
    has gone (gloo: connection reset) -- or None for any other error."""
    if not isinstance(error, jax.errors.JaxRuntimeError) or not is_initialized() or jax.process_count() < 2:
        return None
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"a collective with the other processes failed (has one of them stopped?): {first}"


def leave(code: int, message: str | None = None) -> NoReturn:
    """End this process now, after ``error: message`` on stderr. For a process whose peers are
    gone or never came: a normal exit would run JAX's distributed shutdown, which waits for
    them (up to its heartbeat timeout) and then aborts with a stack trace."""
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def is_main() -> bool:
    """Whether this is process 0, the one that prints."""
    return jax.process_index() == 0


def host_value(x: Any) -> np.ndarray:
    """``x`` as a numpy array on this host, whichever process holds its pieces.

    A fully addressable or fully replicated array is read locally; any other is gathered
    with ``multihost_utils.process_allgather`` -- a collective, so every process must call
    this for the same array at the same point of the program.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def spans_processes(tree: Any) -> bool:
    """Whether any array in ``tree`` has pieces on devices of other processes."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree))


@contextlib.contextmanager
def main_process_output() -> Iterator[None]:
    """Only process 0 prints, and its stdout holds only what the program prints.

    On processes other than 0, stdout and stderr (Python's and the C++ runtime's) go to
    /dev/null for the duration. On process 0 the runtime's own stdout chatter (gloo announces
    its connections there) goes to stderr, so stdout is what a single process would print.
    The streams come back on exit: an error raised inside still reaches every process's stderr.
    """
    if not is_initialized():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    python_stdout = sys.stdout
    if is_main():
        if _writes_to_fd(sys.stdout, 1):  # keep Python's stdout on the real one
            sys.stdout = open(os.dup(saved[0]), "w", encoding=python_stdout.encoding or "utf-8")
        os.dup2(saved[1], 1)
    else:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if sys.stdout is not python_stdout:
            sys.stdout.close()
            sys.stdout = python_stdout
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _writes_to_fd(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False
