"""``python -m workbench generate``: prompts in, tokens out, through the engine's decode slots.

    python -m workbench generate --prompt "def main(" --prompt-ids 1,2,3 --max-new-tokens 32 \\
        --host-devices 8 --mesh data=2,tensor=4 --decode-batch 2 [--json [--return-logits]
        [--logprobs K] [--prompt-logprobs]]

Every prompt is one request; all of them go through one Scheduler (continuous batching), more
requests than ``--decode-batch`` slots waiting their turn. No sampling flag means greedy.
``--json`` prints one object on stdout; otherwise each request's text streams to stdout line by
line, in input order, under a progress bar on stderr. ``--prefix-cache-mb MB`` keeps prefilled
prompt blocks for the prompts that share them (``workbench.PrefixCache``); with ``--json`` the
object then holds ``"prefix_cache": {"hits", "tokens_reused", "bytes", "evictions"}``.
``--logprobs K`` gives each request ``"logprobs"``: per generated token ``{"token", "logprob",
"top": [[id, logprob], ...]}`` (the K best, best first); ``--prompt-logprobs`` gives
``"prompt_logprobs"``: per prompt token log p(token | tokens before it), null for the first. Both
are the model's own distribution, before any sampling flag (``engine/logprobs.py``).
``--capture attention,residual --capture-out FILE.npz`` saves each request's activations
(``cli/capture.py`` lists the kinds and the file's keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from workbench.cli import capture
from workbench.cli.common import CliError, add_engine_arguments, load_engine
from workbench.cli.launch import add_process_arguments
from workbench.cli.streaming import TextStream


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


def parse_megabytes(text: str) -> float:
    """``--prefix-cache-mb``: a non-negative number of megabytes (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"malformed size {text!r}: expected a number of megabytes like 64 or 0.5"
        ) from None
    if not value >= 0 or value == float("inf"):  # NaN fails the comparison
        raise argparse.ArgumentTypeError(f"the size must be a non-negative number of megabytes, got {text!r}")
    return value


def parse_adapter(text: str) -> tuple[str, str]:
    """``chat=path/to/adapter`` -> ``("chat", "path/to/adapter")``."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"malformed adapter {text!r}: expected NAME=PATH")
    return name.strip(), path.strip()


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
    requests.add_argument(
        "--prefix-cache-mb",
        type=parse_megabytes,
        default=0.0,
        metavar="MB",
        help="keep prefilled prompt blocks in MB megabytes of device memory, reused by prompts that share them "
        "(0: off); --json reports its hits",
    )
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
    output.add_argument(
        "--logprobs", type=int, default=None, metavar="K", help="with --json: each token's log-probability, K best"
    )
    output.add_argument(
        "--prompt-logprobs", action="store_true", help="with --json: each prompt token's log-probability"
    )
    output.add_argument("--capture", default=None, metavar="KINDS", help=capture.HELP)
    output.add_argument("--capture-out", default=None, metavar="FILE.npz", help="where --capture writes (numpy .npz)")


def run(args: argparse.Namespace) -> int:
    """Check the flags, load the engine, queue every request, then stream text or print JSON."""
    check_flags(args)
    kinds = capture.parse_kinds(args.capture, args.capture_out)
    sampling = sampling_of(args)
    adapters = adapter_choices(args, len(args.requests))

    from workbench.checkpoints.tokenizer import missing_tokenizer
    from workbench.engine.scheduler import Scheduler

    if args.checkpoint is not None and any(kind == "text" for kind, _ in args.requests):  # before the weights load
        missing = missing_tokenizer(args.checkpoint)
        if missing is not None:
            raise CliError(f"{missing}; give token ids with --prompt-ids (e.g. --prompt-ids 1,2,3) instead of --prompt")
    engine, params = load_engine(args, **({"adapters": dict(args.adapter)} if args.adapter else {}))
    prompts = encode(args.requests, engine.tokenizer)
    if args.logprobs is not None and args.logprobs > engine.config.vocab_size:
        raise CliError(f"--logprobs {args.logprobs} exceeds the model's vocabulary of {engine.config.vocab_size}")
    scheduler = Scheduler(
        engine,
        params,
        sampling=sampling,
        seed=args.seed,
        return_logits=args.return_logits,
        logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs,
        pack_prefill=args.pack_prefill,
        prefix_cache=prefix_cache_of(args, engine),
    )
    budget = submit(scheduler, prompts, args, adapters)
    if args.json:
        completions = scheduler.run()
        report = json_report(args, engine, sampling, completions)
        if scheduler.prefix_cache is not None:
            report["prefix_cache"] = scheduler.prefix_cache.stats()
        print(json.dumps(report))
    else:
        with TextStream(engine.tokenizer, prompts, num_samples=args.num_samples, total=budget) as stream:
            scheduler.on_token, scheduler.on_finish = stream.token, stream.finish
            completions = scheduler.run()
    if kinds:
        capture.write(args.capture_out, engine, params, completions, kinds)
    return 0


def prefix_cache_of(args: argparse.Namespace, engine):
    """The ``--prefix-cache-mb`` cache of ``engine`` (None when 0); its warning (a budget below one
    block's KV) as one ``warning:`` line on stderr."""
    if not args.prefix_cache_mb:
        return None
    from workbench.engine.prefix_cache import PrefixCache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = PrefixCache(engine, args.prefix_cache_mb)
    for warning in caught:
        print(f"warning: --prefix-cache-mb {args.prefix_cache_mb:g}: {warning.message}", file=sys.stderr)
    return cache


def check_flags(args: argparse.Namespace) -> None:
    """The mistakes the flags alone show, named by flag, before the (slow) engine load. The rest
    (token ids, prompt lengths, sample counts, sampling values, the mesh) the engine and the
    scheduler check, in one line each that ``run``'s caller prints."""
    if not args.requests:
        raise CliError("give at least one --prompt or --prompt-ids")
    for index, (kind, value) in enumerate(args.requests):
        if kind == "text" and not value:
            raise CliError(f"request {index}: empty prompt")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    given = {"--return-logits": args.return_logits, "--logprobs": args.logprobs is not None}
    for flag in (f for f, on in (given | {"--prompt-logprobs": args.prompt_logprobs}).items() if on):
        if not args.json:
            raise CliError(f"{flag} needs --json")
    if args.logprobs is not None and args.logprobs < 1:
        raise CliError(f"--logprobs must be at least 1 (how many top tokens to report), got {args.logprobs}")
    # The scheduler refuses this too, but only after the load and without naming the two flags.
    if args.num_samples > max(args.decode_batch, 1):  # a bad --decode-batch is the engine's to name
        raise CliError(f"--num-samples {args.num_samples} exceeds the {args.decode_batch} slots of --decode-batch")


def adapter_choices(args: argparse.Namespace, count: int) -> list[str | None]:
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


def sampling_of(args: argparse.Namespace):
    """The sampling flags as a ``Sampling``; none given: greedy. The engine checks the values."""
    from workbench.engine import GREEDY, Sampling

    if args.temperature is None and args.top_k is None and args.top_p is None:
        return GREEDY
    temperature = 1.0 if args.temperature is None else args.temperature
    return Sampling(temperature=temperature, top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)


def encode(requests: list[tuple[str, Any]], tokenizer) -> list[list[int]]:
    """Each request's token ids: ``--prompt-ids`` as given, ``--prompt`` text through the tokenizer."""
    if tokenizer is None and any(kind == "text" for kind, _ in requests):
        index = next(i for i, (kind, _) in enumerate(requests) if kind == "text")
        raise CliError(f"request {index}: this model has no tokenizer; give --prompt-ids instead of --prompt")
    return [tokenizer.encode(value) if kind == "text" else value for kind, value in requests]


def submit(scheduler, prompts: list[list[int]], args: argparse.Namespace, adapters: list[str | None]) -> int:
    """Queue every prompt (the scheduler's one-line errors, prefixed with the request); returns
    how many tokens they may generate in all (the progress bar's total). A request that would run
    past ``--max-target-length`` is clipped to it, with a warning."""
    limit, budget = scheduler.engine.max_target_length, 0
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
        room = limit - len(prompt)
        if args.max_new_tokens > room:
            print(
                f"warning: request {index}: --max-new-tokens {args.max_new_tokens} clipped to {room} "
                f"(a {len(prompt)}-token prompt within --max-target-length {limit})",
                file=sys.stderr,
            )
        budget += min(args.max_new_tokens, room) * args.num_samples
    return budget


def json_report(args: argparse.Namespace, engine, sampling, completions) -> dict[str, Any]:
    """The ``--json`` object. Each request's fields are its first sample's; with
    ``--num-samples`` above 1, ``samples`` holds all of them."""
    by_request: dict[int, list] = {}
    for completion in completions:  # in submission order, a request's samples in sample order
        by_request.setdefault(completion.request.id, []).append(completion)
    requests = []
    for samples in by_request.values():
        entry = completion_json(samples[0], engine.tokenizer, args.return_logits)
        if args.num_samples > 1:
            entry["samples"] = [completion_json(c, engine.tokenizer, args.return_logits) for c in samples]
        if samples[0].prompt_logprobs is not None:  # one prompt for every sample
            entry["prompt_logprobs"] = samples[0].prompt_logprobs
        requests.append(entry)
    return {
        "checkpoint": args.checkpoint,
        "mesh": dict(engine.mesh.shape),
        "sampling": {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "seed": args.seed,
        },
        "requests": requests,
    }


def completion_json(completion, tokenizer, return_logits: bool) -> dict[str, Any]:
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
    if completion.logprobs is not None:
        entry["logprobs"] = [scored.to_json() for scored in completion.logprobs]
    return entry
