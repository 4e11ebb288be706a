"""``python -m workbench launch`` and the CLI's joining of processes, on small processes of their own:
each signal stops every process the launcher started (also when it was started with SIGINT
ignored), and a process that cannot join its coordinator ends in one line within ``--timeout``.
(A whole multi-process run, launched, is in tests/test_distributed.py.)"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.cli.launch import GRACE_S, launch, reserved_port, stop


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", "generate", *args, "--prompt-ids", "1,2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=Path(__file__).parent.parent,
    )


def test_generate_that_cannot_join_fails_in_one_line_within_its_timeout():
    """An unreachable coordinator, peers that never come, a coordinator port in use: each one
    ``error:`` line naming the address, within ``--timeout`` (JAX alone would wait 300 s, then abort)."""
    with reserved_port() as silent, reserved_port() as lonely, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        join = ["--num-processes", "2", "--timeout", "2"]
        started = time.monotonic()
        processes = {
            "unreachable": _run_cli([*join, "--process-id", "1", "--coordinator", f"127.0.0.1:{silent}"]),
            "alone": _run_cli([*join, "--process-id", "0", "--coordinator", f"127.0.0.1:{lonely}"]),
            "busy": _run_cli([*join, "--process-id", "0", "--coordinator", f"127.0.0.1:{busy}"]),
        }
        said = {}
        try:
            for name, process in processes.items():
                out, said[name] = process.communicate(timeout=120)
                assert (process.returncode, out) == (2 if name == "busy" else 1, ""), f"{name}: {said[name]}"
        finally:
            stop(list(processes.values()), grace=1)
        elapsed = time.monotonic() - started
    want = {
        "unreachable": f"error: process 1 could not join the coordinator at 127.0.0.1:{silent} within 2 s",
        "alone": f"error: process 0 (the coordinator at 127.0.0.1:{lonely}) waited 2 s for all 2 processes",
        "busy": f"error: process 0 could not start the coordinator on port {busy}: is the port in use?",
    }
    for name, line in want.items():
        assert said[name].startswith(line) and said[name].count("\n") == 1, f"{name}: {said[name]}"
    assert elapsed < 45, f"{elapsed:.0f} s"  # start-up and 2 s, far from JAX's 62 s fallback here


def test_launch_bad_input_is_one_line(capsys):
    assert main(["launch", "--processes", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: give the command to launch after --")
    assert main(["launch", "--processes", "0", "--", "generate"]) == 2
    assert main(["generate", "--num-processes", "2", "--process-id", "2", "--prompt-ids", "1"]) == 2
    assert "--process-id must be in 0..1" in capsys.readouterr().err
    assert main(["generate", "--coordinator", "nohost", "--prompt-ids", "1"]) == 2
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err
    assert main(["generate", "--coordinator", "127.0.0.1:1", "--timeout", "0", "--prompt-ids", "1"]) == 2
    assert "error: --timeout must be a positive number of seconds, got 0.0" in capsys.readouterr().err


def test_launcher_stops_everyone_on_timeout(tmp_path, capfd):
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    started = time.monotonic()
    code = launch([sys.executable, "-c", "import time; time.sleep(60)"], processes=2, timeout=1)
    assert code == 124 and time.monotonic() - started < 15
    assert "timed out after 1 s" in capfd.readouterr().err
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == handlers


def test_stop_kills_what_ignores_sigterm_after_the_grace():
    """SIGKILL after the grace, or as soon as ``hurry()`` says so (the launcher: another signal)."""
    ignoring = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    )
    for grace, hurry, took_at_least in ((0.5, bool, 0.5), (GRACE_S, lambda: True, 0.0)):
        stubborn = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, start_new_session=True)
        try:
            assert stubborn.stdout.readline()  # SIGTERM is ignored from here on
            started = time.monotonic()
            stop([stubborn], grace=grace, hurry=hurry)
            took = time.monotonic() - started
            assert stubborn.returncode == -signal.SIGKILL and took_at_least <= took < GRACE_S - 1, took
        finally:
            if stubborn.poll() is None:
                stubborn.kill()
                stubborn.wait()


def test_a_signal_while_starting_starts_no_more_and_stops_what_started(monkeypatch):
    """The handlers are in place before the first process starts, and only record: a signal
    between two starts cannot leave a started process behind, nor start the next."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    started, original = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(original(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: the launcher's handler has it
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    assert launch([sys.executable, "-c", "import time; time.sleep(60)"], processes=3) == 128 + signal.SIGTERM
    assert len(started) == 1 and started[0].returncode == -signal.SIGTERM


def test_a_reserved_port_is_held_for_a_coordinator_only():
    """What the launcher relies on: while held, nothing else binds the port (nor gets it as an
    ephemeral port), yet a listener that sets SO_REUSEADDR, as the coordinator does, can."""
    with reserved_port() as port:
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
            with socket.socket(family) as other, pytest.raises(OSError):
                other.bind((address, port))
        with socket.socket(socket.AF_INET6) as coordinator:
            coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            coordinator.bind(("::", port))
            coordinator.listen()
    assert _port_free(port)


SLEEPER = """
import os, signal, socket, subprocess, sys, time
out, i = sys.argv[1], os.environ["JAX_PROCESS_ID"]
if i == "0":  # listen on the coordinator's port, as JAX's coordinator would, and start a process of its own
    port = int(os.environ["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[1])
    server = socket.socket(socket.AF_INET6)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::", port))
    server.listen()
    open(os.path.join(out, "port"), "w").write(str(port))
    open(os.path.join(out, "grandchild"), "w").write(str(subprocess.Popen(["sleep", "120"]).pid))
open(os.path.join(out, i + ".tmp"), "w").write(str(os.getpid()))
os.rename(os.path.join(out, i + ".tmp"), os.path.join(out, i))
time.sleep(120)
"""


IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for its parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _port_free(port: int) -> bool:
    """Nothing bound to ``port`` on any address (no SO_REUSEADDR: a held port counts as taken)."""
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::", port))
        except OSError:
            return False
    return True


def test_each_signal_stops_every_process(tmp_path):
    """SIGINT, SIGTERM and SIGHUP -- and SIGINT to a launcher started with SIGINT ignored, as
    ``nohup`` and CI runners start it -- each stop every process the launcher started (and what
    they started), free the coordinator's port, and end the launcher with 128 + the signal."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    cases = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "ignored": signal.SIGINT}
    launchers = {}
    try:
        for name in cases:
            (tmp_path / name).mkdir()
            command = ["-m", "workbench", "launch", "--processes", "2", "--", str(script), str(tmp_path / name)]
            if name == "ignored":  # SIG_IGN survives exec (a handler would not): set it, then exec the launcher
                command = ["-c", IGNORING_SIGINT, *command]
            launchers[name] = subprocess.Popen(
                [sys.executable, *command],
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                cwd=Path(__file__).parent.parent,
            )
        deadline = time.monotonic() + 120
        for name, launcher in launchers.items():
            while not all((tmp_path / name / str(i)).exists() for i in range(2)):
                assert time.monotonic() < deadline and launcher.poll() is None, f"{name}: the processes did not start"
                time.sleep(0.05)
            launcher.send_signal(cases[name])
        for name, launcher in launchers.items():
            assert launcher.wait(30) == 128 + cases[name], name
            said = launcher.stderr.read()
            assert f"launch: {cases[name].name} received; stopping every process" in said, f"{name}: {said}"
            pids = [int((tmp_path / name / file).read_text()) for file in ("0", "1", "grandchild")]
            deadline = time.monotonic() + 10  # the grandchild is reaped by init, a moment later
            while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert all(_gone(pid) for pid in pids), f"{name}: {[pid for pid in pids if not _gone(pid)]} still running"
            assert _port_free(int((tmp_path / name / "port").read_text())), name
    finally:
        for launcher in launchers.values():
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
