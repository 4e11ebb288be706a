"""``python -m workbench export``: a checkpoint (workbench or Hugging Face) written back as a
Hugging Face one (``config.json`` + ``model.safetensors``) that transformers loads; quantized
weights dequantized, an adapter merged if given (``workbench.checkpoints.export_hf``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.common import CliError
from workbench.model.quant import MODES as QUANTIZE_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="IN", required=True, help="HF dir or workbench orbax dir")
    parser.add_argument("--out", metavar="DIR", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
    parser.add_argument(
        "--quantize", choices=QUANTIZE_MODES, default=None, help="quantize first (written back dequantized)"
    )
    parser.add_argument("--adapter", metavar="PEFT_DIR", default=None, help="a LoRA adapter to merge into the weights")
    parser.add_argument("--host-devices", type=int, default=None, metavar="N", help="simulate N CPU devices")


def run(args: argparse.Namespace) -> int:
    import workbench
    from workbench.checkpoints import export_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"--out {args.out} exists and is not empty")
    adapters = {"merged": args.adapter} if args.adapter else None
    # the smallest engine: export reads only its params (no step is compiled)
    engine, params = workbench.load(
        args.checkpoint,
        decode_batch_size=1,
        max_prefill_length=16,
        max_target_length=16,
        dtype=args.dtype,
        quantize=args.quantize,
        adapters=adapters,
    )
    path = export_hf(engine, params, out, adapter="merged" if adapters else None)
    print(f"wrote {path} ({engine.config.num_layers} layers, {engine.config.num_params():,} params)")
    return 0
