"""Hugging Face checkpoints: ``*.safetensors`` -> params on a mesh (the config: ``hf_config``).

One file or several (``model.safetensors.index.json``); float32, bfloat16 or float16 tensors.
A missing tensor, a tensor of the wrong shape, or one the model has no place for (``o_proj.bias``,
say) is an error that names it.

Every tensor goes straight into its target sharding, shard by shard: for each device,
``jax.make_array_from_callback`` asks for the region of our array that device holds, and we
read just the HF rows of that region from the file (``safetensors_files``: no memory map, so no
file pages linger in the process's memory) and hand it over in our axis order (``checkpoints/placement.py``).
A bf16 checkpoint served in bf16 never passes through float32; a quantized load (``transform``)
quantizes each tensor as it is placed. The whole model is never on one device, nor twice on the host.

HF stores a projection as ``[out, in]`` with heads flattened into one axis; we store
``q [D, N, H]``, ``o [N, H, D]``, ``gate [D, F]`` and so on (see ``_layouts``). HF Llama's rope
is the "rotate half" layout, which is ours, so q/k rows need no permutation.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from workbench.checkpoints.hf_config import read_json
from workbench.checkpoints.placement import Layout, Stacked, place
from workbench.checkpoints.safetensors_files import CorruptFile, Scratch, Tensor, read_header, tensors_of
from workbench.model import ModelConfig
from workbench.trees import leaf_paths, nest

PLACE_THREADS = 2  # tensors placed at once (see _placed_in_order)

INDEX_FILE = "model.safetensors.index.json"
TENSOR_DTYPES = ("F32", "BF16", "F16")
PROGRESS_BYTES = 256 * 2**20  # show a progress bar from this checkpoint size on


# ---- layouts -----------------------------------------------------------------------------------
def _layouts(config: ModelConfig) -> dict[str, Layout]:
    """Our param path -> its HF tensor and layout, for every param of ``config``."""
    d, n, k, h, f, v = (
        config.embed_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
        config.vocab_size,
    )
    layouts = {
        "embed/embedding": Layout("model.embed_tokens.weight", ((v,), (d,)), (0, 1)),  # [V, D]
        "final_norm/scale": Layout("model.norm.weight", ((d,),), (0,)),
    }
    if not config.tie_embeddings:
        layouts["lm_head"] = Layout("lm_head.weight", ((v,), (d,)), (1, 0))  # [V, D] -> [D, V]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers/{i}"
        # Projections: HF [out, in] -> ours [in, out], heads split out (q: [N*H, D] -> [D, N, H];
        # o: [D, N*H] -> [N, H, D]; gate/up: [F, D] -> [D, F]; down: [D, F] -> [F, D]).
        # Norms: Llama's post_attention_layernorm is the MLP's input norm; Gemma's sandwich calls
        # that one pre_feedforward_layernorm and normalizes both sublayers' outputs.
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
        if config.post_norms:
            norms = {
                "attn_norm": "input_layernorm",
                "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm",
            }
        layouts |= {
            f"{ours}/{mine}/scale": Layout(f"{hf}.{theirs}.weight", ((d,),), (0,)) for mine, theirs in norms.items()
        }
        if config.qk_norm:  # one [H] scale per projection, shared by its heads
            layouts |= {
                f"{ours}/attn/{x}_norm/scale": Layout(f"{hf}.self_attn.{x}_norm.weight", ((h,),), (0,)) for x in "qk"
            }
        layouts |= {
            f"{ours}/attn/q": Layout(f"{hf}.self_attn.q_proj.weight", ((n, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/k": Layout(f"{hf}.self_attn.k_proj.weight", ((k, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/v": Layout(f"{hf}.self_attn.v_proj.weight", ((k, h), (d,)), (2, 0, 1)),
            f"{ours}/attn/o": Layout(f"{hf}.self_attn.o_proj.weight", ((d,), (n, h)), (1, 2, 0)),
        }
        layouts |= (
            _experts(config, i)
            if config.sparse(i)
            else {
                f"{ours}/mlp/gate": Layout(f"{hf}.mlp.gate_proj.weight", ((f,), (d,)), (1, 0)),
                f"{ours}/mlp/up": Layout(f"{hf}.mlp.up_proj.weight", ((f,), (d,)), (1, 0)),
                f"{ours}/mlp/down": Layout(f"{hf}.mlp.down_proj.weight", ((d,), (f,)), (1, 0)),
            }
        )
        if config.qkv_bias:
            layouts |= {
                f"{ours}/attn/q_bias": Layout(f"{hf}.self_attn.q_proj.bias", ((n, h),), (0, 1)),  # [N*H] -> [N, H]
                f"{ours}/attn/k_bias": Layout(f"{hf}.self_attn.k_proj.bias", ((k, h),), (0, 1)),
                f"{ours}/attn/v_bias": Layout(f"{hf}.self_attn.v_proj.bias", ((k, h),), (0, 1)),
            }
    return layouts


def _experts(config: ModelConfig, i: int) -> dict[str, Layout]:
    """A sparse layer's router and experts: Mixtral's ``block_sparse_moe.gate`` and
    ``experts.<j>.w1 / w3 / w2``, or (with q/k norms) Qwen3-MoE's ``mlp.gate`` and
    ``experts.<j>.gate_proj / up_proj / down_proj``; each expert's [out, in] stacked to ours
    [E, in, out]."""
    e, d, f = config.num_experts, config.embed_dim, config.expert_dim
    hf, ours = f"model.layers.{i}", f"layers/{i}/mlp"
    if config.qk_norm:
        block, names = f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        block, names = f"{hf}.block_sparse_moe", ("w1", "w3", "w2")

    def stacked(name: str) -> tuple[str, ...]:
        return tuple(f"{block}.experts.{j}.{name}.weight" for j in range(e))

    return {
        f"{ours}/router": Layout(f"{block}.gate.weight", ((e,), (d,)), (1, 0)),  # [E, D] -> [D, E]
        f"{ours}/experts/gate": Layout(stacked(names[0]), ((e,), (f,), (d,)), (0, 2, 1)),  # E x [F, D] -> [E, D, F]
        f"{ours}/experts/up": Layout(stacked(names[1]), ((e,), (f,), (d,)), (0, 2, 1)),
        f"{ours}/experts/down": Layout(stacked(names[2]), ((e,), (d,), (f,)), (0, 2, 1)),  # E x [D, F] -> [E, F, D]
    }


def _tensor(tensors: dict[str, Tensor], layout: Layout) -> Tensor | Stacked:
    return Stacked(tuple(tensors[n] for n in layout.name)) if isinstance(layout.name, tuple) else tensors[layout.name]


# ---- tensors -----------------------------------------------------------------------------------
def _tensors(path: Path) -> dict[str, Tensor]:
    """HF tensor name -> the tensor (its file, dtype, shape and offset, read from the headers)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"corrupt Hugging Face checkpoint: {index} has no weight_map")
        tensors: dict[str, Tensor] = {}
        for file in dict.fromkeys(weight_map.values()):
            if not (path / file).is_file():
                held = next(name for name, f in weight_map.items() if f == file)
                raise ValueError(f"corrupt Hugging Face checkpoint: {file} (holding {held}) is missing")
            tensors |= read_header(path / file)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"corrupt Hugging Face checkpoint: {weight_map[missing[0]]} lacks {missing[0]}")
        return tensors
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {other[0]}: only safetensors checkpoints are supported)" if other else ""
        raise ValueError(f"no *.safetensors files in Hugging Face checkpoint {path}{hint}")
    return tensors_of(files)


def _check_tensors(tensors: dict[str, Tensor], layouts: dict[str, Layout], config: ModelConfig) -> None:
    wanted = {name for layout in layouts.values() for name in layout.names}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"Hugging Face checkpoint lacks tensor {missing[0]} ({len(missing)} missing in all)")
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()  # some tied checkpoints store it anyway
    unexpected = sorted(n for n in set(tensors) - wanted - ignored if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(
            f"unsupported Hugging Face checkpoint: unexpected tensor {unexpected[0]} "
            f"({len(unexpected)} in all) -- a feature this loader does not implement"
        )
    for layout in layouts.values():
        stacked = isinstance(layout.name, tuple)
        for name in layout.names:
            tensor, shape = tensors[name], layout.hf_shape[1:] if stacked else layout.hf_shape
            if tensor.shape != shape:
                raise ValueError(f"Hugging Face tensor {name} has shape {tensor.shape} but config.json implies {shape}")
            if tensor.dtype not in TENSOR_DTYPES:
                raise ValueError(f"unsupported dtype {tensor.dtype} of tensor {name}")
        if stacked and len({tensors[n].dtype for n in layout.names}) > 1:
            raise ValueError(f"the experts of {layout.names[0]} are stored in different dtypes")


def load_hf_params(
    path: str | os.PathLike,
    abstract_params: Any,
    shardings: Any,
    *,
    config: ModelConfig | None = None,
    progress: bool | None = None,
    transform: Callable[[str, jax.Array], dict[str, jax.Array]] | None = None,
) -> dict:
    """The HF checkpoint's weights as a pure dict of arrays placed in ``shardings``, shaped and
    typed like ``abstract_params`` (say, an engine's ``abstract_params`` and ``param_shardings``).

    ``config``: the model the params belong to (default: the checkpoint's ``config.json``; pass
    it when the abstract params use another dtype). ``progress``: a tqdm bar on stderr (None:
    only for large checkpoints). ``transform``: ``(path, array) -> {path: array, ...}``, called
    on each array as soon as it is placed, its result kept instead (say, ``quant.quantize_leaf``:
    then only one full-precision weight is ever alive).
    """
    path = Path(path)
    if config is None:
        from workbench.checkpoints.hf_config import read_hf_config

        config = read_hf_config(path)
    layouts = _layouts(config)
    abstract = leaf_paths(abstract_params)
    shardings = leaf_paths(shardings)
    if set(layouts) != set(abstract):
        raise ValueError(f"no HF layout for params {sorted(set(abstract) ^ set(layouts))}")
    scratches = threading.local()  # one Scratch per placing thread

    def placed(ours: str) -> jax.Array:
        if not hasattr(scratches, "scratch"):
            scratches.scratch = Scratch()
        tensor = _tensor(tensors, layouts[ours])
        return place(tensor, layouts[ours], abstract[ours], shardings[ours], scratches.scratch)

    try:
        tensors = _tensors(path)
        _check_tensors(tensors, layouts, config)
        total = sum(_tensor(tensors, layout).nbytes for layout in layouts.values())
        flat = {}
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"loading {path.name}",
            file=sys.stderr,
            disable=not (total >= PROGRESS_BYTES if progress is None else progress),
        ) as bar:
            for ours, placed in _placed_in_order(list(layouts), placed):
                array = placed.result()
                flat.update({ours: array} if transform is None else transform(ours, array))
                del array, placed  # transformed: the placed array is let go before the next is read
                bar.update(_tensor(tensors, layouts[ours]).nbytes)
    except (CorruptFile, OSError) as error:  # a malformed or truncated file, one that vanished mid-way
        raise ValueError(f"corrupt Hugging Face checkpoint {path}: {error}") from None
    return nest(flat)


def _placed_in_order(names: list[str], place: Callable[[str], jax.Array]) -> Iterator[tuple[str, Future]]:
    """``(name, future of place(name))`` in order, with ``PLACE_THREADS`` tensors in flight: reads
    and transfers release the GIL, so one tensor's page faults and copies overlap another's (a 1B
    bf16 load on 2 cores: 3.3 s -> 2.75 s). A transform applied as each is taken still sees one
    full-precision weight at a time, beside those being read."""
    # One at a time over several processes: each must run its programs (a widening's transpose)
    # in the same order as the others.
    threads = PLACE_THREADS if jax.process_count() == 1 else 1
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        for name in names:
            pending.append((name, pool.submit(place, name)))
            if len(pending) == threads:
                yield pending.popleft()
        yield from pending
