"""The kernel manager test_browser's JupyterLab server runs: jupyter_server's own, listable from
the moment it exists.

jupyter_server 2.21 with jupyter_client 8.10 has a race: jupyter_client adds a starting kernel to
the server's kernels one event-loop turn before the server gives it a ``last_activity``, and a
``GET /api/kernels`` answered in that turn fails with a 500 (``TraitError: ... expected a
datetime, not the NoneType None``). JupyterLab polls that list, so whenever a notebook's kernel
started the browser console could log "Failed to load resource: ... 500": JupyterLab's and the
server's doing, not the notebooks'. Measured with 16 kernel starts against a thread listing the
kernels: 7 of about 1500 lists answered 500 with the server's manager, none with this one.
"""

from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.kernelmanager import ServerKernelManager
from traitlets import default


class ListableKernelManager(ServerKernelManager):
    """A kernel read before the server marks its start is as active as at that moment."""

    @default("last_activity")
    def _listed_before_marked(self):
        return utcnow()
