"""Write a random-weight Hugging Face checkpoint of a preset: the scale benchmarks' model, offline.

    python scripts/write_checkpoint.py --preset llama3-1b --out /tmp/llama1b [--dtype bfloat16] [--seed 0]

``config.json`` (``LlamaForCausalLM``) and one ``model.safetensors``, as Llama-3.2-1B ships
(bfloat16), with the seeded random weights of ``workbench.model.init`` (norm scales ones, every
other weight normal with the init's std). Written tensor by tensor (``save_hf_checkpoint``):
memory holds one tensor at a time, whatever the preset's size. No tokenizer is written: prompt
the model with token ids (``generate --prompt-ids``). Nothing downloads.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from workbench.checkpoints.hf_write import save_hf_checkpoint
from workbench.model.config import PRESETS, preset
from workbench.model.init import draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama3-1b")
    parser.add_argument("--out", required=True, help="a new (or empty) directory")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="of the stored weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = preset(args.preset)
    start = time.perf_counter()
    try:
        path = save_hf_checkpoint(
            args.out, config, lambda name, shape: draw(name, shape, np.float32, args.seed), dtype=args.dtype
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({size / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
