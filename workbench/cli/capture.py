"""``generate --capture KINDS --capture-out FILE.npz``: each request's activations, saved.

After the requests finish, each request's sequence (its prompt and the tokens it generated, all
but the last: every token a step read) runs once through the uncached forward pass under
``workbench.probes.Capture`` (``probes.forward``, the oracle the cached steps are tested
against; with the request's adapter), and the asked kinds go into one ``.npz``:

    request<i>/tokens                 [T]        the token ids captured over (int32)
    request<i>/attention/layer<l>     [N, T, T]  attention weights, query x key
    request<i>/attn_out/layer<l>      [T, D]     what attention adds to the residual stream
    request<i>/mlp/layer<l>           [T, D]     what the MLP adds
    request<i>/residual/layer<l>      [T, D]     the residual stream after block l
    request<i>/heads/layer<l>         [T, N, H]  each query head's output before o
    request<i>/logits                 [T, V]     float32

``i`` is the request's place on the command line; with ``--num-samples`` the first sample's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.cli.common import CliError

KINDS = ("attention", "attn_out", "mlp", "residual", "heads", "logits")
HELP = (
    f"comma-separated kinds to capture per request, from {', '.join(KINDS)}, written to --capture-out as "
    "request<i>/tokens [T], request<i>/<kind>/layer<l> (attention [N, T, T]; attn_out, mlp, residual [T, D]; "
    "heads [T, N, H]) and request<i>/logits [T, V], over the prompt and the generated tokens but the last"
)


def parse_kinds(text: str | None, out: str | None) -> tuple[str, ...]:
    """``attention,residual`` -> ``("attention", "residual")``; () when not asked. CliError for an
    unknown kind, or for one of --capture / --capture-out without the other."""
    if text is None and out is None:
        return ()
    if text is None:
        raise CliError("--capture-out needs --capture KINDS (e.g. --capture attention,residual)")
    if out is None:
        raise CliError("--capture needs --capture-out FILE.npz")
    if not Path(out).parent.is_dir():
        raise CliError(f"--capture-out {out}: the directory {str(Path(out).parent)!r} does not exist")
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    for kind in kinds:
        if kind not in KINDS:
            raise CliError(f"--capture: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    return kinds


def write(path: str, engine, params, completions, kinds: tuple[str, ...]) -> None:
    """Capture ``kinds`` over each request's sequence (its first sample) and save them to ``path``."""
    from workbench import probes

    capture = probes.Capture(
        attention="attention" in kinds or "attn_out" in kinds,
        residual="residual" in kinds,
        mlp="mlp" in kinds,
        logits="logits" in kinds,
        heads="heads" in kinds,
    )
    firsts = [c for c in completions if c.sample == 0]  # in submission order: request i is the i-th
    sequences = [list(c.request.prompt) + list(c.tokens[:-1]) for c in firsts]
    # Every request right-padded to one power of two (causal: padding changes no real position),
    # so one compiled program serves them all.
    length = min(max(16, 1 << (max(map(len, sequences)) - 1).bit_length()), engine.max_target_length)
    arrays = {}
    for i, (completion, tokens) in enumerate(zip(firsts, sequences)):
        n = len(tokens)
        padded = np.zeros((1, length), np.int32)
        padded[0, :n] = tokens
        _, captured = probes.forward(engine, params, padded, capture, adapter=completion.request.adapter)
        prefix = f"request{i}"
        arrays[f"{prefix}/tokens"] = np.asarray(tokens, np.int32)
        for kind in kinds:
            if kind == "logits":
                arrays[f"{prefix}/logits"] = captured.logits[0, :n].astype(np.float32)
                continue
            site = "mlp_out" if kind == "mlp" else kind
            for layer in captured.layers:
                value = captured.site(site, layer)[0]
                arrays[f"{prefix}/{kind}/layer{layer}"] = value[:, :n, :n] if kind == "attention" else value[:n]
    np.savez(path, **arrays)
