"""Side by side: workbench against transformers' greedy ``generate`` on one Llama checkpoint.

    .venv/bin/python scripts/side_by_side.py OUT_DIR [--quick] [--precision]

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

import side_by_side_precision
import side_by_side_targets
from side_by_side_shared import hf_step_ms, make_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, points and steps (a smoke run)")
    parser.add_argument("--precision", action="store_true", help="only the precision table (see above)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import jax
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    versions = dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__)

    def log(*parts) -> None:  # progress and the report go to stderr
        print(*parts, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama-56m"
        make_checkpoint(checkpoint)
        model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        hf_step_ms(model, 2, 16, 2)  # warm-up
        if args.precision:
            return side_by_side_precision.run(checkpoint, model, args.out_dir, quick=args.quick, log=log)
        return side_by_side_targets.run(checkpoint, model, args.out_dir, quick=args.quick, versions=versions, log=log)


if __name__ == "__main__":
    sys.exit(main())
