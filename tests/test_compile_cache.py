"""The persistent compilation cache: written by one process, read back by the next; a corrupt or
unwritable directory costs one warning and the cache, never the run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench import compile_cache

# A fresh process: turn the cache on, compile and run one program, say what the cache did.
PROGRAM = """
import collections, jax, jax.numpy as jnp
from workbench import compile_cache
compile_cache.enable()
before = collections.Counter(compile_cache.counts)
print(float(jax.jit(lambda x: jnp.sin(x).sum())(jnp.arange(5.0))), compile_cache.status(before))
"""


def run_program(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WORKBENCH_COMPILE_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)


def test_a_second_process_reads_what_the_first_wrote_and_a_corrupt_cache_is_left_alone(tmp_path):
    first, second = run_program(tmp_path), run_program(tmp_path)
    assert first.returncode == 0 and first.stdout.split()[1:] == ["miss"], first.stderr
    assert second.returncode == 0 and second.stdout.split()[1:] == ["hit"], second.stderr
    for run in (first, second):  # the program read back computes what the compiled one did
        assert abs(float(run.stdout.split()[0]) - np.sin(np.arange(5.0)).sum()) < 1e-5
    assert "warning" not in first.stderr + second.stderr
    assert any(name.startswith("jit_canary") for name in os.listdir(tmp_path))

    for entry in tmp_path.iterdir():
        entry.write_bytes(b"not a cache entry")
    corrupt = run_program(tmp_path)  # one warning, no cache, the right answer
    assert corrupt.returncode == 0 and corrupt.stdout.split()[1:] == ["off"], corrupt.stderr
    assert abs(float(corrupt.stdout.split()[0]) - np.sin(np.arange(5.0)).sum()) < 1e-5
    warnings = [line for line in corrupt.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: compile cache {tmp_path}: entries cannot be read")


@pytest.fixture
def no_cache():
    """This process without the run's cache (conftest), given back afterwards."""
    compile_cache.disable()
    yield
    compile_cache.enable()


def test_an_unwritable_directory_costs_one_warning_and_the_cache(tmp_path, capsys, no_cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "jax") is None and compile_cache.directory() is None
    assert compile_cache.status() == "off"
    err = capsys.readouterr().err
    assert (
        err == f"warning: compile cache {blocker / 'jax'} is not usable (Not a directory): compiling without a cache\n"
    )


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WORKBENCH_COMPILE_CACHE": "off"}, None),
        ({"WORKBENCH_COMPILE_CACHE": "/somewhere/else"}, Path("/somewhere/else")),
        ({"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/workbench/jax")),
        ({"HOME": "/home/someone"}, Path("/home/someone/.cache/workbench/jax")),
    ],
)
def test_the_directory_comes_from_the_environment(monkeypatch, env, expected):
    for name in ("WORKBENCH_COMPILE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert compile_cache.default_directory() == expected


def test_the_suite_never_reads_a_cache_from_before_the_run():
    """The suite (and the notebooks and CLI processes it starts) shares one cache that the run made
    empty: never the user's, never an earlier run's."""
    run_cache = Path(os.environ["WORKBENCH_TEST_RUN_CACHE"])
    assert Path(os.environ["WORKBENCH_COMPILE_CACHE"]) == run_cache == compile_cache.directory()
    assert run_cache.name.startswith("workbench-test-xla-") and run_cache != compile_cache.cache_home() / "jax"
