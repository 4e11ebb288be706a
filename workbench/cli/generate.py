"""``python -m workbench generate``: prompts in, tokens out, through the engine's decode slots.

    python -m workbench generate --prompt "def main(" --prompt-ids 1,2,3 --max-new-tokens 32 \\
        --host-devices 8 --mesh data=2,tensor=4 --decode-batch 2 [--json [--return-logits]]

Every prompt is one request; all of them go through one Scheduler (continuous batching), more
requests than ``--decode-batch`` slots waiting their turn. No sampling flag means greedy.
``--json`` prints one object on stdout; otherwise each request's text streams to stdout line by
line, in input order, under a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.cli.common import CliError, add_engine_arguments, load_engine
from workbench.cli.launch import add_process_arguments


class _AddRequest(argparse.Action):
    """``--prompt`` and ``--prompt-ids`` share one list, so requests keep their command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        requests = list(getattr(namespace, self.dest) or [])
        requests.append((self.const, value))
        setattr(namespace, self.dest, requests)


def parse_ids(text: str) -> list[int]:
    """``1,2,3`` -> ``[1, 2, 3]``."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError("empty prompt: give comma-separated token ids like 1,2,3")
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"malformed ids {text!r}: expected comma-separated integers like 1,2,3"
        ) from None


def parse_adapter(text: str) -> tuple[str, str]:
    """``chat=path/to/adapter`` -> ``("chat", "path/to/adapter")``."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"malformed adapter {text!r}: expected NAME=PATH")
    return name.strip(), path.strip()


def _adapter_choices(args: argparse.Namespace, count: int) -> list[str | None]:
    """Each request's adapter (None: base) from ``--use-adapter``, checked against ``--adapter``."""
    loaded = dict(args.adapter)
    if len(loaded) != len(args.adapter):
        raise CliError("--adapter: each NAME may be given once")
    if "base" in loaded:
        raise CliError("--adapter: the name 'base' is reserved for the model without adapters")
    chosen = args.use_adapter or ["base"]
    if len(chosen) not in (1, count):
        raise CliError(
            f"--use-adapter given {len(chosen)} times: give it once (all prompts) or once per prompt ({count})"
        )
    for name in chosen:
        if name != "base" and name not in loaded:
            raise CliError(f"--use-adapter {name}: unknown adapter (loaded: {', '.join(loaded) or 'none'})")
    chosen = chosen * count if len(chosen) == 1 else chosen
    return [None if name == "base" else name for name in chosen]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_process_arguments(parser)
    requests = parser.add_argument_group("requests")
    # --prompt and --prompt-ids append to one list, so requests keep their command-line order.
    each = dict(dest="requests", action=_AddRequest, help="repeatable; each is one request")
    requests.add_argument("--prompt", const="text", metavar="TEXT", **each)
    requests.add_argument("--prompt-ids", const="ids", type=parse_ids, metavar="1,2,3", **each)
    requests.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="per request (default 32)")
    requests.add_argument("--ignore-eos", action="store_true", help="run every request to --max-new-tokens")
    requests.add_argument(
        "--num-samples", type=int, default=1, metavar="N", help="N continuations per prompt from one prefill"
    )
    requests.add_argument("--pack-prefill", action="store_true", help="prefill waiting short prompts packed in one row")
    adapters = parser.add_argument_group("LoRA adapters (PEFT format)")
    adapters.add_argument(
        "--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=PATH", help="repeatable"
    )
    adapters.add_argument(
        "--use-adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="once: for every prompt; once per prompt: in order; 'base' for none",
    )
    sampling = parser.add_argument_group("sampling (no sampling flag: greedy)")
    sampling.add_argument("--temperature", type=float, default=None, metavar="T")
    sampling.add_argument("--top-k", type=int, default=None, metavar="K")
    sampling.add_argument("--top-p", type=float, default=None, metavar="P")
    sampling.add_argument("--seed", type=int, default=0, metavar="S")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object on stdout")
    output.add_argument(
        "--return-logits", action="store_true", help="with --json: each generated token's float32 logits row"
    )


def _sampling(args: argparse.Namespace):
    from workbench.engine import GREEDY, Sampling

    if args.temperature is None and args.top_k is None and args.top_p is None:
        return GREEDY
    temperature = 1.0 if args.temperature is None else args.temperature
    return Sampling(temperature=temperature, top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)


def run(args: argparse.Namespace) -> int:
    if not args.requests:
        raise CliError("give at least one --prompt or --prompt-ids")
    for index, (kind, value) in enumerate(args.requests):
        if kind == "text" and not value:
            raise CliError(f"request {index}: empty prompt")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.return_logits and not args.json:
        raise CliError("--return-logits needs --json")
    if args.num_samples < 1:
        raise CliError(f"--num-samples must be positive, got {args.num_samples}")
    if args.num_samples > max(args.decode_batch, 1):  # a bad --decode-batch is the engine's to name
        raise CliError(f"--num-samples {args.num_samples} exceeds the {args.decode_batch} slots of --decode-batch")
    sampling = _sampling(args)
    adapters = _adapter_choices(args, len(args.requests))

    from workbench.engine.scheduler import Scheduler

    engine, params = load_engine(args, **({"adapters": dict(args.adapter)} if args.adapter else {}))
    tokenizer = engine.tokenizer
    prompts = []
    for index, (kind, value) in enumerate(args.requests):
        if kind == "text":
            if tokenizer is None:
                raise CliError(f"request {index}: this model has no tokenizer; give --prompt-ids instead of --prompt")
            value = tokenizer.encode(value)
            if not value:
                raise CliError(f"request {index}: the prompt encodes to no tokens")
        prompts.append(value)

    scheduler = Scheduler(
        engine,
        params,
        sampling=sampling,
        seed=args.seed,
        return_logits=args.return_logits,
        pack_prefill=args.pack_prefill,
    )
    limit, budget = engine.max_target_length, 0
    for index, prompt in enumerate(prompts):
        try:
            scheduler.submit(
                prompt,
                max_new_tokens=args.max_new_tokens,
                ignore_eos=args.ignore_eos,
                num_samples=args.num_samples,
                adapter=adapters[index],
            )
        except ValueError as error:
            raise CliError(f"request {index}: {error}") from None
        if len(prompt) + args.max_new_tokens > limit:
            print(
                f"warning: request {index}: --max-new-tokens {args.max_new_tokens} clipped to {limit - len(prompt)} "
                f"(a {len(prompt)}-token prompt within --max-target-length {limit})",
                file=sys.stderr,
            )
        budget += min(args.max_new_tokens, limit - len(prompt)) * args.num_samples
    streams = [(index, sample) for index in range(len(prompts)) for sample in range(args.num_samples)]
    output = None if args.json else _Streamer(tokenizer, prompts, total=budget, streams=streams)
    if output is not None:
        scheduler.on_token, scheduler.on_finish = output.token, output.finish
    try:
        completions = scheduler.run()
    finally:
        if output is not None:
            output.close()

    if args.json:
        report = {
            "checkpoint": args.checkpoint,
            "mesh": dict(engine.mesh.shape),
            "sampling": {
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
                "seed": args.seed,
            },
            "requests": [_request_json(c, tokenizer, args.return_logits) for c in completions if c.sample == 0],
        }
        if args.num_samples > 1:  # a request's fields are its first sample's; "samples" holds all of them
            for entry, index in zip(report["requests"], range(len(prompts))):
                samples = [c for c in completions if c.request.id == index]
                entry["samples"] = [_request_json(c, tokenizer, args.return_logits) for c in samples]
        print(json.dumps(report))
    return 0


def _request_json(completion, tokenizer, return_logits: bool) -> dict[str, Any]:
    entry = {
        "prompt_ids": list(completion.request.prompt),
        "tokens": completion.tokens,
        "text": None if tokenizer is None else tokenizer.decode(completion.tokens),
        "finish_reason": completion.finish_reason,
    }
    if completion.request.adapter is not None:
        entry["adapter"] = completion.request.adapter
    if return_logits:
        entry["logits"] = completion.logits.tolist()  # float32 -> exact as JSON doubles
    return entry


class _Streamer:
    """Text on stdout in input order, a line at a time, with a tqdm bar on stderr.

    Whole lines only, written with the bar cleared, so the bar redraws below the text instead
    of through it. The first unfinished request streams; later ones buffer until it is done.
    """

    def __init__(self, tokenizer, prompts: list[list[int]], *, total: int, streams: list[tuple[int, int]]):
        from tqdm import tqdm

        from workbench.checkpoints import StreamDecoder

        self.tokenizer = tokenizer
        self.bar = tqdm(total=total, unit="tok", desc="generating", file=sys.stderr, dynamic_ncols=True)
        # one stream per (request, sample), written in that order
        self.index = {stream: i for i, stream in enumerate(streams)}
        several = len(streams) > len(prompts)
        self.pending = [self._header(r, s if several else None, prompts[r]) for r, s in streams]  # not yet written
        self.decoders = [StreamDecoder(tokenizer) if tokenizer else None for _ in streams]
        self.finished = [False] * len(streams)
        self.head = 0  # the request whose text is being written

    def _header(self, index: int, sample: int | None, prompt: list[int]) -> str:
        shown = self.tokenizer.decode(prompt) if self.tokenizer else " ".join(map(str, prompt)) + " ->"
        return f"=== request {index}{'' if sample is None else f', sample {sample}'} ===\n{shown}"

    def token(self, request, token: int, sample: int = 0) -> None:
        index = self.index[request.id, sample]
        decoder = self.decoders[index]
        self.pending[index] += decoder.push(token) if decoder else f" {token}"
        self.bar.update(1)
        self._write()

    def finish(self, completion) -> None:
        index = self.index[completion.request.id, completion.sample]
        decoder = self.decoders[index]
        tail = decoder.flush() if decoder else ""
        self.pending[index] += f"{tail}\n[{len(completion.tokens)} tokens, {completion.finish_reason}]\n"
        self.finished[index] = True
        self._write()

    def _write(self) -> None:
        while self.head < len(self.pending):
            text, done = self.pending[self.head], self.finished[self.head]
            cut = len(text) if done else text.rfind("\n") + 1
            if cut:
                with self.bar.external_write_mode(file=sys.stdout):
                    sys.stdout.write(text[:cut])
                    sys.stdout.flush()
                self.pending[self.head] = text[cut:]
            if not done:
                return
            self.head += 1

    def close(self) -> None:
        self.bar.close()
