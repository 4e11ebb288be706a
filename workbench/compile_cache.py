"""JAX's persistent compilation cache, on by default for the CLI and ``notebook_setup()``.

A kernel restart or a new process compiles the engine's programs again: seconds each, more for
deeper models. With the cache, each compiled program is written to disk once and read back by
every later process on this machine.

Where: ``$WORKBENCH_COMPILE_CACHE`` when set (a directory, or ``off``), else
``$XDG_CACHE_HOME/workbench/jax`` (``~/.cache/workbench/jax``). ``--no-compile-cache`` on the
CLI, ``notebook_setup(compile_cache=False)`` or ``WORKBENCH_COMPILE_CACHE=off`` turn it off.

Every program is cached, however small or quick to compile: a cold start is the sum of many
sub-second compiles. What can go wrong is said once, on stderr, and never stops the run:
a directory that cannot be written (no cache), and entries that cannot be read back -- a
corrupt cache, or a host where XLA:CPU rejects its own entries on reload (jax issue 38445).
A canary program, compiled when the cache is turned on (written by the first process, read
back by every later one), finds the latter two before the engine's programs do; the cache is
then turned off for the process.
"""

from __future__ import annotations

import collections
import os
import tempfile
import warnings
from pathlib import Path

ENV = "WORKBENCH_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")
READ_ERROR = "Error reading persistent compilation cache entry"
EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

counts: collections.Counter[str] = collections.Counter()  # hits and misses (entries written) so far
_listening = False
_directory: Path | None = None


def default_directory() -> Path | None:
    """The cache directory the environment asks for: ``$WORKBENCH_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/workbench/jax`` or ``~/.cache/workbench/jax``; None when it says off."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in OFF or not chosen.strip() else Path(chosen).expanduser()
    return cache_home() / "jax"


def cache_home() -> Path:
    """Where workbench keeps what it learns about this machine: ``$XDG_CACHE_HOME/workbench``, else
    ``~/.cache/workbench`` (the compile cache, the autotune choices)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench"


def directory() -> Path | None:
    """The directory in use, or None when the cache is off."""
    return _directory


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on at ``path`` (default :func:`default_directory`); the directory in use,
    or None when it is off (asked for, or refused with one warning). Call before compiling, and
    after anything that must precede JAX's backend (device count, ``jax.distributed``): the
    canary compile starts it."""
    global _directory
    import jax

    target = Path(path).expanduser() if path is not None else default_directory()
    if target is None:
        return None
    problem = _unwritable(target)
    if problem:
        _warn(f"compile cache {target} is not usable ({problem}): compiling without a cache")
        return None
    _listen()
    jax.config.update("jax_compilation_cache_dir", os.fspath(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every entry, however small
    _directory = target
    if not _canary_reads_back():
        disable()
        _warn(
            f"compile cache {target}: entries cannot be read back (a corrupt cache, or a host where "
            f"XLA:CPU rejects its own entries, jax issue 38445): compiling without a cache "
            f"(remove {target} to start afresh)"
        )
        return None
    return target


def disable() -> None:
    """Turn the cache off for this process (entries on disk stay)."""
    global _directory
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    _directory = None


def status(before: collections.Counter[str] | None = None) -> str:
    """``"off"``; ``"hit"`` when every program compiled since ``before`` (a copy of
    :data:`counts`) came from the cache; ``"miss"`` when any had to be compiled and written."""
    if _directory is None:
        return "off"
    since = counts - (before or collections.Counter())
    return "miss" if since["misses"] or not since["hits"] else "hit"


def _unwritable(target: Path) -> str | None:
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".probe-"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax

    def record(event: str, **_: object) -> None:
        if event in EVENTS:
            counts[EVENTS[event]] += 1

    jax.monitoring.register_event_listener(record)
    _listening = True


def _canary_reads_back() -> bool:
    """Compile a tiny program through the cache: the first process writes it, later ones read it
    back; False when reading it back fails."""
    import jax
    import numpy as np

    def canary(x):
        return x * 3 + 1  # a program of our own, so its entry is ours

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(canary).lower(np.float32(0)).compile()
    return not any(str(w.message).startswith(READ_ERROR) for w in caught)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)
