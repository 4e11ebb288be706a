"""More than one process: 2 processes x 4 CPU devices form one 8-device mesh (data=2, tensor=4).

Everything multi-process starts at once, in one module fixture, to keep the wall time small on
a small machine (every process pays for its own JAX start-up and compiles):

- ``run`` through ``python -m workbench launch`` on 2 processes x 4 devices, and on 1 process x
  8 devices of the same distributed runtime (gloo collectives): prefill / insert / generate, the
  scheduler greedy and seeded, orbax save and restore, the inspectors, autotune's choice, and the
  CLI (tests/distributed_worker.py);
- ``die`` through the launcher, and ``cli_die`` without it: process 1 exits mid-run.

Meanwhile this (8-device, single-process) pytest process computes the references. Every
process runs in its own process group with a hard deadline, and the finalizer kills what is left.
The launcher's signals and the CLI's failures to join: tests/test_launch.py.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import jax
import numpy as np
import pytest
from flax import nnx

import workbench
from helpers import SMALL, engine_for, lively_arrays, write_hf
from workbench import checkpoints, distributed
from workbench.cli import main
from workbench.cli.launch import process_env, reserved_port, stop
from workbench.trees import leaf_paths

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
DEADLINE_S = 300  # for everything together; the runs take about a minute on 2 busy cores
MARKER = "CLI OUTPUT FOLLOWS\n"


class Group:
    """Processes started together, each with its own stdout/stderr file and process group."""

    def __init__(self, tmp: Path):
        self.tmp, self.children, self.started = tmp, {}, {}
        self.ports = contextlib.ExitStack()  # coordinator ports held until the processes end

    def start(self, name: str, command: list[str], env: dict | None = None) -> None:
        out, err = open(self.tmp / f"{name}.out", "w"), open(self.tmp / f"{name}.err", "w")
        self.children[name] = subprocess.Popen(
            command, env=env, stdout=out, stderr=err, start_new_session=True, cwd=Path(__file__).parent.parent
        )
        self.started[name] = time.monotonic()

    def start_processes(self, name: str, args: list[str], processes: int, devices: int) -> None:
        """Without the launcher: processes ``{name}0``, ``{name}1``, ... on a port held for them."""
        port = self.ports.enter_context(reserved_port())
        for i in range(processes):
            self.start(f"{name}{i}", [sys.executable, WORKER, *args], process_env(i, processes, port, devices))

    def launch(self, name: str, args: list[str], processes: int, devices: int) -> None:
        """Through ``python -m workbench launch``: one launcher, the processes' output in its files."""
        counts = ["--processes", str(processes), "--host-devices", str(devices), "--timeout", str(DEADLINE_S)]
        self.start(name, [sys.executable, "-m", "workbench", "launch", *counts, "--", WORKER, *args])

    def close(self) -> None:
        stop(list(self.children.values()))
        self.ports.close()
        for child in self.children.values():
            assert child.poll() is not None

    def wait(self, name: str, deadline: float) -> int:
        try:
            return self.children[name].wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(list(self.children.values()))
            pytest.fail(f"{name} still running at the deadline:\n{self.output(name)}")

    def output(self, name: str, stream: str = "err", tail: int = 4000) -> str:
        """The process's stdout or stderr without gloo's connection notices (the last ``tail`` characters).
        Gloo's threads write those concurrently, so a notice can be split over two lines."""
        text = (self.tmp / f"{name}.{stream}").read_text()
        notice = ("[Gloo]", "connected peer ranks")
        return "\n".join(line for line in text.splitlines() if not any(n in line for n in notice))[-tail:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine, params):
    tmp = tmp_path_factory.mktemp("distributed")
    # A checkpoint saved by one process on data=4 x tensor=2, for the 2-process run to restore.
    other = worker.engine_on({"data": 4, "tensor": 2})
    saved_params = other.load_params(lively_arrays(other, seed=1))
    checkpoints.save_checkpoint(tmp / "from_4x2", other.config, saved_params, tokenizer={"type": "bytes"})

    # A Hugging Face checkpoint, for each process to import only its devices' regions of.
    hf_params = jax.tree.map(np.asarray, nnx.to_pure_dict(engine_for(SMALL, {"data": 1}).load_params(None, seed=3)))
    write_hf(tmp / "hf", SMALL, hf_params)

    group = Group(tmp)
    for name in ("two", "one", "launched", "bare"):
        (tmp / name).mkdir()
    group.launch("two", ["run", str(tmp / "two"), str(tmp / "from_4x2"), str(tmp / "hf")], 2, 4)
    group.start_processes("one", ["run", str(tmp / "one"), str(tmp / "from_4x2"), str(tmp / "hf")], 1, 8)
    group.launch("launched", ["die", str(tmp / "launched")], 2, 4)
    group.start_processes("bare", ["cli_die", str(tmp / "bare")], 2, 4)
    try:
        reference = {}
        state = worker.api_steps(engine, params, reference)
        worker.scheduled(engine, params, reference)
        reference["kv_filled"] = workbench.inspect.kv_cache(state).stats["filled"]
        reference["cli"] = _cli_in_process()
        reference["hf"] = hf_params
        yield group, tmp, reference, saved_params
    finally:
        group.close()


def _cli_in_process() -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(worker.CLI) == 0
    return buffer.getvalue()


@pytest.fixture(scope="module")
def results(runs):
    group, tmp, _, _ = runs
    deadline = time.monotonic() + DEADLINE_S
    for name in ("two", "one0"):
        code = group.wait(name, deadline)
        assert code == 0, f"{name} exited with {code}:\n{group.output(name)}"
    files = {"two0": "two/process0.npz", "two1": "two/process1.npz", "one0": "one/process0.npz"}
    return {name: dict(np.load(tmp / file)) for name, file in files.items()}


def test_two_processes_form_one_mesh_and_decide_alike(results):
    assert (int(results["two0"]["devices"]), int(results["two0"]["local_devices"])) == (8, 4)
    assert int(results["one0"]["local_devices"]) == 8
    # Every process read back the same tokens and logits, so its scheduler took the same steps.
    assert results["two0"].keys() == results["two1"].keys()
    for key, value in results["two0"].items():
        np.testing.assert_array_equal(value, results["two1"][key], err_msg=key)


def test_two_processes_equal_one_process_bitwise(results):
    """2 x 4 devices against 1 x 8 under the same collectives (gloo): every token and logit."""
    for key, value in results["one0"].items():
        # What differs by design: local device counts, device ids (2048+ on process 1), kv_cache's refusal,
        # autotune's choice (one process takes the cached one).
        if not key.startswith(("inspect/", "hf_read/", "autotune/")) and key != "local_devices":
            np.testing.assert_array_equal(results["two0"][key], value, err_msg=key)


def test_two_processes_match_the_in_process_engine(runs, results):
    """Against this process's engine (in-process collectives): the same tokens, greedy and
    sampled; logits equal to float32 rounding (the all-reduce over tensor adds in another order)."""
    _, _, reference, _ = runs
    two = results["two0"]
    for key, value in reference.items():
        if key in ("cli", "kv_filled", "hf"):
            continue
        if key.endswith("logits"):
            np.testing.assert_allclose(two[key], value, rtol=0, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(two[key], value, err_msg=key)
    np.testing.assert_array_equal(two["inspect/kv_filled"], reference["kv_filled"])


def test_cli_prints_on_process_zero_only_and_like_one_process(runs, results):
    group, _, reference, _ = runs
    printed = group.output("two", "out", tail=10**7)  # both processes' stdout, through the launcher
    assert printed.count(MARKER.strip()) == 2, printed  # each prints it before the CLI starts
    # Process 0 prints only after collectives with process 1, so after both markers: once.
    assert printed.rsplit(MARKER.strip(), 1)[1].strip() == reference["cli"].strip()
    assert json.loads(reference["cli"])["requests"][0]["tokens"]


def test_a_multi_process_mesh_keeps_the_fixed_decode_library(results):
    """autotune: one process takes the cached choice (YNNPACK); two keep the fixed one (they
    would otherwise compile, and round, apart), without a probe; a forced one is taken."""
    from workbench.engine import autotune

    assert str(results["one0"]["autotune/cached"]) == "ynnpack" != autotune.FIXED
    for name in ("two0", "two1"):
        assert str(results[name]["autotune/cached"]) == autotune.FIXED, name
        assert str(results[name]["autotune/unset"]) == autotune.FIXED, name
        assert str(results[name]["autotune/forced"]) == "ynnpack", name


def test_orbax_across_processes_bitwise(runs, results):
    _, tmp, _, saved_params = runs
    # saved by one process on 4x2, restored by two on 2x4
    want = leaf_paths(nnx.to_pure_dict(saved_params))
    for path, value in want.items():
        np.testing.assert_array_equal(results["two0"][f"restored/{path}"], np.asarray(value), err_msg=path)
    # saved by two processes on 2x4, restored by one on 4x2
    engine, params = workbench.load(
        tmp / "two" / "saved",
        mesh={"data": 4, "tensor": 2},
        decode_batch_size=4,
        max_prefill_length=32,
        max_target_length=64,
    )
    assert dict(engine.mesh.shape)["data"] == 4
    written = worker.engine_on({"data": 4, "tensor": 2})
    expected = leaf_paths(lively_arrays(written, seed=0))
    for path, value in leaf_paths(params).items():
        np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=path)


def test_hf_import_reads_each_process_regions_only(runs, results):
    _, _, reference, _ = runs
    for path, value in leaf_paths(reference["hf"]).items():
        np.testing.assert_array_equal(results["two0"][f"hf/{path}"], value, err_msg=path)
    total = sum(np.size(value) for value in leaf_paths(reference["hf"]).values())
    assert int(results["one0"]["hf_read/elements"]) == total  # one process reads every element once
    for name in ("two0", "two1"):  # the embed axis is split between the processes: each reads part
        assert int(results[name]["hf_read/elements"]) < 0.75 * total, name


def test_inspectors_see_the_whole_mesh(results):
    two = results["two0"]
    assert int(two["inspect/state_mismatches"]) == 0
    assert len(two["inspect/state_devices"]) == 8  # under transfer_guard("disallow")
    assert "gather=True" in str(two["inspect/kv_refused"])
    np.testing.assert_array_equal(two["inspect/device_processes"], [0, 0, 0, 0, 1, 1, 1, 1])
    assert "process" in str(two["inspect/sharding_text"])
    assert str(results["one0"]["inspect/kv_refused"]) == ""  # one process: nothing to gather
    np.testing.assert_array_equal(two["inspect/kv_filled"], results["one0"]["inspect/kv_filled"])
    assert "snapshot" in str(two["inspect/diff_refused"]) and str(results["one0"]["inspect/diff_refused"]) == ""
    assert two["inspect/diff_changed"].any()  # one generate step wrote a position per active slot
    np.testing.assert_array_equal(two["inspect/diff_changed"], results["one0"]["inspect/diff_changed"])


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_dying_process_stops_the_launch(runs):
    group, tmp, _, _ = runs
    code = group.wait("launched", time.monotonic() + DEADLINE_S)
    assert code == 3, group.output("launched")
    assert "launch: process 1 exited with code 3; stopping the other 1" in group.output("launched")
    for i in range(2):
        assert _dead(int((tmp / "launched" / f"pid{i}").read_text()))


def test_a_lost_process_ends_generate_with_one_error_line(runs):
    """No launcher: process 1 dies mid-``generate``; process 0's next collective fails (gloo: the
    connection is reset), and the CLI says so in one line, exits 1, and does not wait for JAX's
    heartbeat timeout (whose shutdown would end it with an abort and a C++ stack trace)."""
    group, tmp, _, _ = runs
    deadline = time.monotonic() + DEADLINE_S
    assert group.wait("bare1", deadline) == 3, group.output("bare1")
    code = group.wait("bare0", deadline)
    said = group.output("bare0", tail=10**7)
    assert code == 1, said
    lines = [line for line in said.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], said  # (gloo's notices come before: they are noise)
    assert errors[0].startswith("error: a collective with the other processes failed"), said
    assert not any(sign in said for sign in ("Traceback", "Check failure", "Terminating process")), said
    waited = (tmp / "bare0.err").stat().st_mtime - float((tmp / "bare" / "died").read_text())
    assert waited < distributed.HEARTBEAT_TIMEOUT_S, f"process 0 took {waited:.0f} s to notice"


def test_host_value_reads_local_arrays():
    import jax.numpy as jnp

    np.testing.assert_array_equal(distributed.host_value(jnp.arange(3)), np.arange(3))
    assert not distributed.spans_processes({"a": jnp.zeros(2)})


def test_initialize_names_bad_values(monkeypatch):
    with pytest.raises(ValueError, match="process_id must not be negative"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=-1)
    with pytest.raises(TypeError, match="num_processes must be an int"):
        distributed.initialize("127.0.0.1:1234", num_processes="2", process_id=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        distributed.initialize("127.0.0.1:1234", process_id=0)
    assert distributed.requested() and not distributed.is_initialized()
