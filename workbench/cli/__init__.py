"""``python -m workbench <command>``: generate | bench | tour | launch | export.

Every command takes the engine flags of :mod:`workbench.cli.common`. Bad input exits with code
2 and one line ``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from workbench.cli.common import CliError, apply_host_devices
from workbench.cli.launch import join_processes

COMMANDS = {
    "generate": ("workbench.cli.generate", "generate tokens for one or more prompts"),
    "bench": ("workbench.cli.bench", "measure prefill, insert and decode speed"),
    "tour": ("workbench.cli.tour", "a short tour: the split state, prefill -> insert -> generate"),
    "launch": ("workbench.cli.launch", "run a command as N local processes over one mesh"),
    "export": ("workbench.cli.export", "write a checkpoint back as a Hugging Face one (config.json + safetensors)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 -- like every other bad input
        raise CliError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m workbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)  # a missing module is a bug: let it raise
        modules[name].add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    try:
        args = parser.parse_args(argv)
        apply_host_devices(args.host_devices)  # before anything starts JAX's backend
        join_processes(args)  # likewise; with --coordinator or $JAX_COORDINATOR_ADDRESS only
        if getattr(args, "compile_cache", False):  # the engine commands; before their first compile
            from workbench import compile_cache

            compile_cache.enable()
        from workbench.distributed import main_process_output

        with main_process_output():  # only process 0 prints; errors still reach every stderr
            return int(modules[args.command].run(args) or 0)
    except (CliError, ValueError, TypeError, FileNotFoundError) as error:  # the one place errors become a line
        lines = str(error).strip().splitlines() or [type(error).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:  # over several processes: a collective whose peer is gone, as one line
        from workbench import distributed

        if (line := distributed.failure_line(error)) is None:
            raise
        distributed.leave(1, line)  # JAX's shutdown would wait for the lost peer, then abort
