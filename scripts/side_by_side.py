"""Side by side: workbench against transformers' greedy ``generate`` on one Llama checkpoint.

    .venv/bin/python scripts/side_by_side.py OUT_DIR [--quick] [--precision]
    flock /work/bigmem.lock .venv/bin/python scripts/side_by_side.py OUT_DIR --curves --checkpoint DIR
        [--dtype float32|bfloat16] [--contexts 256,1024,...] [--batches 1,8,...] [--lengths 128,...]

Both read the same Hugging Face checkpoint (a 56M-parameter Llama, ``ModelConfig.llama_56m()``,
random weights saved with ``save_pretrained``) in float32 on the CPU, in one run. Writes to
OUT_DIR: ``results.md`` (tables and the four targets), ``results.json``, and three plots --
decode step time against decode batch and against context length, prefill time against prompt
length (``side_by_side_targets.py``). The machine is shared, so the targets are measured in
interleaved rounds -- the machine's read bandwidth, our step, transformers' step, our insert at
batch 64 -- and each ratio is the median of the rounds' ratios.

``--precision`` measures instead, in interleaved rounds at decode batch 8, our step and insert in
each precision (float32, bfloat16 -- on the CPU bf16 weights with float32 compute --, w8, w8a8, w4) beside
transformers' step in the same precision:
float32, bfloat16 (``model.to(torch.bfloat16)``) and, for w8a8, torch's dynamic int8
(``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``); w8 and w4 have no torch
counterpart on CPU and are set beside its float32. Writes ``precision.md`` and ``precision.json``
(``side_by_side_precision.py``).

``--curves`` measures, on the checkpoint ``--checkpoint`` (a Hugging Face directory; the
Llama-3.2-1B shape is the point), the decode step against context length and decode batch and
prefill against prompt length, ours and transformers' point by point; writes ``curves_DTYPE.*``
(``side_by_side_curves.py``).

Transformers' step time is the median gap between consecutive calls of a stopping criterion,
i.e. one pass of its decode loop (forward, greedy pick, bookkeeping); ours is the median of
``engine.generate`` calls, each blocked until ready (:func:`workbench.bench.measure`). Bandwidth
is one measure throughout, the machine's all-core read bandwidth
(:func:`workbench.bench.read_gb_per_s`, the roofline of ``python -m workbench bench``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import side_by_side_curves
import side_by_side_precision
import side_by_side_targets
from side_by_side_shared import hf_step_ms, make_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, points and steps (a smoke run)")
    parser.add_argument("--precision", action="store_true", help="only the precision table (see above)")
    curves = parser.add_argument_group("curves (--curves)")
    curves.add_argument("--curves", action="store_true", help="only the curves (see above)")
    curves.add_argument("--checkpoint", type=Path, default=None, help="the HF checkpoint of the curves")
    curves.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both sides' dtype")
    ints = _int_list
    curves.add_argument("--contexts", type=ints, default=side_by_side_curves.CONTEXTS, help="cached tokens")
    curves.add_argument("--batches", type=ints, default=side_by_side_curves.BATCHES, help="decode batches")
    curves.add_argument("--lengths", type=ints, default=side_by_side_curves.LENGTHS, help="prompt lengths")
    curves.add_argument("--curve-steps", type=int, default=3, help="timed decode steps a cell (default 3)")
    curves.add_argument("--kv-budget-gib", type=float, default=2.0, help="largest KV cache of a cell (GiB)")
    args = parser.parse_args(argv)
    if args.curves and args.checkpoint is None:
        parser.error("--curves needs --checkpoint (a Hugging Face checkpoint directory)")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import jax
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    versions = dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__)

    def log(*parts) -> None:  # progress and the report go to stderr
        print(*parts, file=sys.stderr, flush=True)

    if args.curves:
        dtype = getattr(torch, args.dtype)
        model = transformers.LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        return side_by_side_curves.run(
            args.checkpoint,
            model,
            args.out_dir,
            dtype=args.dtype,
            batches=args.batches,
            contexts=args.contexts,
            lengths=args.lengths,
            steps=args.curve_steps,
            budget=int(args.kv_budget_gib * 2**30),
            log=log,
        )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama-56m"
        make_checkpoint(checkpoint)
        model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        hf_step_ms(model, 2, 16, 2)  # warm-up
        if args.precision:
            return side_by_side_precision.run(checkpoint, model, args.out_dir, quick=args.quick, log=log)
        return side_by_side_targets.run(checkpoint, model, args.out_dir, quick=args.quick, versions=versions, log=log)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    sys.exit(main())
