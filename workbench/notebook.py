"""``workbench.notebook_setup()``: one call at the top of a notebook for stable, rich outputs.

Importable anywhere: treescope, matplotlib and IPython are imported when the function runs,
and the IPython parts are skipped when no IPython shell is running (scripts, tests).
"""

from __future__ import annotations

from typing import Any


def _ipython() -> Any | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def notebook_setup(*, dpi: int = 100, autovisualize_arrays: bool = True, compile_cache: bool = True) -> None:
    """Treescope as the default renderer, its array autovisualizer, matplotlib inline, and the
    persistent compilation cache (``compile_cache``; see :mod:`workbench.compile_cache`). The
    cache's check compiles a tiny program, which starts JAX's backend: set the device count and
    call ``workbench.distributed.initialize`` before this, as the notebooks' first cell does.

    Treescope renders non-streaming and uncompressed: a streamed rendering is empty HTML plus
    a compressed payload with random ids, which nbval could never compare. Objects with their
    own ``_repr_html_`` (the inspectors' reports) keep it. Figures render inline as PNG at
    ``dpi`` (nbval skips PNGs; print the numbers that matter beside each figure).
    """
    import matplotlib
    import treescope

    if compile_cache:
        from workbench import compile_cache as cache

        cache.enable()
    shell = _ipython()
    if shell is not None:
        treescope.register_as_default(streaming=False, compress_html=False)
        treescope.register_autovisualize_magic()
        if getattr(shell, "kernel", None) is not None:  # a Jupyter kernel, not a terminal IPython
            shell.run_line_magic("matplotlib", "inline")
            from matplotlib_inline.backend_inline import set_matplotlib_formats

            set_matplotlib_formats("png")
    if autovisualize_arrays:
        treescope.active_autovisualizer.set_globally(treescope.ArrayAutovisualizer())
    matplotlib.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "image.interpolation": "nearest",  # cache heatmaps are cells, not images to smooth
            "svg.hashsalt": "workbench",  # deterministic ids should anyone save SVG
        }
    )
