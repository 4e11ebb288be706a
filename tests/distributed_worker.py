"""One process of the multi-process tests (tests/test_distributed.py); the JAX_* environment
variables of ``workbench.cli.launch.process_env`` say which.

    python tests/distributed_worker.py run OUT_DIR RESTORE_DIR HF_DIR  # engine, scheduler, checkpoints, inspectors, CLI
    python tests/distributed_worker.py die OUT_DIR                     # process 1 dies mid-run
    python tests/distributed_worker.py cli_die OUT_DIR                 # the CLI's generate; process 1 dies mid-run

``run`` writes ``OUT_DIR/process{i}.npz`` (every process: what it read back on its host),
saves its params to ``OUT_DIR/saved`` (every process writing its own shards), then runs the
CLI's ``generate`` after a marker line on stdout. The engine's
shape and weights are the conftest's shared engine and ``lively_params``, so the pytest process
can compute the single-process reference itself.
"""

import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import workbench
from helpers import lively_arrays  # tests/ is this script's directory, first on sys.path
from workbench import compile_cache, distributed
from workbench.engine.scheduler import run_requests
from workbench.trees import leaf_paths

# The CLI in-process: only process 0 prints, and prints what one process would.
CLI = [
    "generate",
    "--mesh",
    "data=2,tensor=4",
    "--decode-batch",
    "2",
    "--max-prefill-length",
    "32",
    "--max-target-length",
    "64",
    "--prompt-ids",
    "1,2,3",
    "--prompt",
    "hi",
    "--prompt-ids",
    "9,8,7,6",
    "--max-new-tokens",
    "5",
    "--ignore-eos",
    "--json",
]
PROMPTS = [[1, 2, 3, 4, 5], [7] * 11, list(range(30, 50)), [200, 3, 99], [5, 6]]
SAMPLING = workbench.Sampling(temperature=0.9, top_k=20)
# A tiny Gemma 3: a sliding layer's ring of 4 beside a global layer's full cache, a rope each
# fmt: off
GEMMA3 = workbench.ModelConfig.tiny(
    num_layers=2, layer_types=("sliding_attention", "full_attention"), sliding_window=4, local_rope_theta=100.0,
    qk_norm=True, norm_offset=1.0, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh",
    query_pre_attn_scalar=24, tie_embeddings=False,  # tied, sqrt(D)-scaled embeddings make it echo its prompt
)
# fmt: on


def engine_on(mesh: dict, config: workbench.ModelConfig | None = None) -> workbench.Engine:
    return workbench.Engine(
        config or workbench.ModelConfig.tiny(),
        workbench.make_mesh(mesh),
        decode_batch_size=4,
        max_prefill_length=32,
        max_target_length=64,
    )


def api_steps(engine, params, out: dict) -> None:
    """prefill three prompts -> insert into slots 0..2 -> six generate steps, greedy."""
    state = engine.init_decode_state(0)
    for slot, prompt in enumerate(PROMPTS[:3]):
        padded, length = engine.pad(prompt)
        prefix, result = engine.prefill(params=params, padded_tokens=padded, true_length=length)
        out[f"api/prefill{slot}/data"] = np.asarray(result.data)
        out[f"api/prefill{slot}/logits"] = np.asarray(result.logits)
        state = engine.insert(prefix, state, slot)
    for step in range(6):
        state, result = engine.generate(params, state)
        out[f"api/generate{step}/data"] = np.asarray(result.data)
        out[f"api/generate{step}/logits"] = np.asarray(result.logits)
    return state


def gemma3_steps(out: dict) -> None:
    """The tiny Gemma 3 on the same mesh: a 20-token prompt (longer than the ring) prefilled into
    slot 1 beside an empty slot, then four greedy steps."""
    engine = engine_on({"data": 2, "tensor": 4}, GEMMA3)
    params = engine.load_params(lively_arrays(engine))
    padded, length = engine.pad(PROMPTS[2])
    prefix, result = engine.prefill(params=params, padded_tokens=padded, true_length=length)
    out["gemma3/prefill/logits"] = np.asarray(result.logits)
    state = engine.insert(prefix, engine.init_decode_state(0), 1)
    for step in range(4):
        state, result = engine.generate(params, state)
        out[f"gemma3/generate{step}/data"] = np.asarray(result.data)
        out[f"gemma3/generate{step}/logits"] = np.asarray(result.logits)


def scheduled(engine, params, out: dict) -> None:
    for name, options in (("greedy", {}), ("sampled", {"sampling": SAMPLING, "seed": 7})):
        completions = run_requests(engine, params, PROMPTS, max_new_tokens=6, return_logits=True, **options)
        for i, c in enumerate(completions):
            out[f"{name}/{i}/tokens"] = np.asarray(c.tokens)
            out[f"{name}/{i}/logits"] = c.logits


def inspectors(engine, params, state, out: dict) -> None:
    with jax.transfer_guard("disallow"):
        report = workbench.inspect.state(engine, params, state)
        sharding = workbench.inspect.sharding(nnx.to_pure_dict(params), engine.mesh)
        str(report), str(sharding)
    out["inspect/state_mismatches"] = np.asarray(len(report.mismatches))
    out["inspect/state_devices"] = np.asarray(sorted({d for r in report.to_rows() for d in r["devices"]}))
    out["inspect/device_processes"] = np.asarray([r["process"] for r in sharding.per_device])
    out["inspect/sharding_text"] = np.asarray(str(sharding))
    try:
        workbench.inspect.kv_cache(state)
        out["inspect/kv_refused"] = np.asarray("")
    except ValueError as error:
        out["inspect/kv_refused"] = np.asarray(str(error))
    kv = workbench.inspect.kv_cache(state, gather=True)
    out["inspect/kv_filled"] = kv.stats["filled"]
    out["inspect/kv_next"] = np.asarray([r["next_position"] for r in kv.to_rows()])
    before = workbench.inspect.snapshot(state)  # gathered on every process
    after, _ = engine.generate(params, state)
    try:
        workbench.inspect.kv_cache_diff(before, after)
        out["inspect/diff_refused"] = np.asarray("")
    except ValueError as error:
        out["inspect/diff_refused"] = np.asarray(str(error))
    out["inspect/diff_changed"] = workbench.inspect.kv_cache_diff(before, workbench.inspect.snapshot(after)).mask


def hf_import(hf_dir: str, out: dict) -> None:
    """A Hugging Face import on fsdp=2 x tensor=4 (the embed axis split between the processes),
    counting the elements this process reads from the files."""
    from workbench.checkpoints import placement

    read, original = [], placement.read_region

    def counting(tensor, layout, index, shape):
        region = original(tensor, layout, index, shape)
        read.append(region.size)
        return region

    placement.read_region = counting
    try:
        _, params = workbench.load(
            hf_dir, mesh={"fsdp": 2, "tensor": 4}, decode_batch_size=2, max_prefill_length=16, max_target_length=32
        )
    finally:
        placement.read_region = original
    out["hf_read/elements"] = np.asarray(sum(read))
    for path, leaf in leaf_paths(params).items():
        out[f"hf/{path}"] = distributed.host_value(leaf)


def run(out_dir: str, restore_dir: str, hf_dir: str) -> None:
    engine = engine_on({"data": 2, "tensor": 4})
    params = engine.load_params(lively_arrays(engine))
    out = {"devices": np.asarray(jax.device_count()), "local_devices": np.asarray(jax.local_device_count())}
    state = api_steps(engine, params, out)
    scheduled(engine, params, out)
    inspectors(engine, params, state, out)
    # Orbax across processes: every process writes, and reads, only its own shards.
    from workbench import checkpoints

    checkpoints.save_checkpoint(os.path.join(out_dir, "saved"), engine.config, params, tokenizer={"type": "bytes"})
    _, restored = workbench.load(
        restore_dir, mesh={"data": 2, "tensor": 4}, decode_batch_size=4, max_prefill_length=32, max_target_length=64
    )
    for path, leaf in leaf_paths(restored).items():
        assert leaf.is_fully_addressable == (jax.process_count() == 1), path  # split between the processes
        out[f"restored/{path}"] = distributed.host_value(leaf)
    hf_import(hf_dir, out)
    gemma3_steps(out)  # rings and two ropes across the processes: compared like every other key
    autotune_choices(engine, out, out_dir)
    np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"), **out)
    if jax.process_count() == 1:
        return
    from workbench.cli import main

    sys.stdout.flush()
    print("CLI OUTPUT FOLLOWS", flush=True)  # every process: the test checks that 1 adds nothing after it
    if main(CLI) != 0:
        sys.exit(1)


def autotune_choices(engine, out: dict, out_dir: str) -> None:
    """The decode library ``autotune`` gives this engine's shape: from a cache file that says
    YNNPACK (one process takes it; several must keep the fixed one), with the setting unset
    (several processes: the fixed one, and no probe), and forced."""
    from workbench.engine import autotune

    config, batch = engine.config, engine.max_concurrent_decodes
    cache = os.path.join(out_dir, f"autotune{jax.process_index()}.json")
    autotune._write(Path(cache), {autotune._key(config, batch): {"library": "ynnpack", "ms": {}}})
    if jax.process_count() > 1:
        autotune.measure = lambda *a: sys.exit("autotune probed on a mesh over several processes")
    for name, setting in (("cached", cache), ("unset", ""), ("forced", "ynnpack")):
        if name == "unset" and jax.process_count() == 1:
            continue  # one process would probe (and write to the user's cache)
        os.environ[autotune.ENV] = setting
        autotune._chosen.clear()
        out[f"autotune/{name}"] = np.asarray(autotune.library(config, batch))
    os.environ[autotune.ENV] = "off"


def die(out_dir: str) -> None:
    """Both processes step a sharded computation; process 1 dies after a few steps."""
    with open(os.path.join(out_dir, f"pid{jax.process_index()}"), "w") as f:
        f.write(str(os.getpid()))
    mesh = workbench.make_mesh({"data": 2, "tensor": 4})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "tensor"))
    x = jax.make_array_from_callback((8, 8), sharding, lambda index: np.ones((8, 8), np.float32)[index])
    step = jax.jit(lambda x: x * 1.0001 + x.sum(), out_shardings=sharding)
    for i in range(10_000):
        if i == 5 and jax.process_index() == 1:
            os._exit(3)
        x = step(x)
        distributed.host_value(x.sum())  # a collective every step, as the scheduler's read-back is
        time.sleep(0.05)


def cli_die(out_dir: str) -> None:
    """``generate`` of the CLI on both processes; process 1 dies at its third decode step, after
    writing the time. Process 0 exits as the CLI makes it (``workbench.cli.main``).

    Process 1 first waits 2 s, so that process 0 is waiting in that step's first collective with
    it, on every device. A process that dies halfway through a collective can instead leave some
    of process 0's devices waiting on a local collective for a sibling whose part failed: a hang
    that only JAX's heartbeat timeout ends (with an abort; see the README)."""
    from workbench.cli import main

    if jax.process_index() == 1:
        original, calls = workbench.Engine.generate, []

        def dying(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                time.sleep(2)
                with open(os.path.join(out_dir, "died"), "w") as f:
                    f.write(repr(time.time()))
                os._exit(3)
            return original(self, *args, **kwargs)

        workbench.Engine.generate = dying
    sys.exit(main([*CLI, "--max-new-tokens", "40"]))  # the last --max-new-tokens counts


if __name__ == "__main__":
    # From the environment (the launcher's, or the test's), before JAX starts; generous: 2 cores start many processes.
    distributed.initialize(timeout=240)
    # The test run's compile cache (conftest's, in the environment), as the CLI would use it: these
    # processes compile many of the same programs (measured alone: the module's setup 76 -> 69 s).
    compile_cache.enable()
    {"run": run, "die": die, "cli_die": cli_die}[sys.argv[1]](*sys.argv[2:])
