"""Expert Sniper Cluster: serving big Mixture-of-Experts GGUF models on modest machines.

Each node runs llama.cpp with a native expert cache (``cluster.engine.cache``) that keeps the hot
experts resident under a byte budget; ``cluster.engine`` is one such node's engine.
"""

import os as _os
import pkgutil as _pkgutil

# Under `ray job submit --working-dir .` the job's copy of this package comes first on sys.path;
# the compiled extensions (cluster._native, cluster._routing) live only in the installed copy, so
# both are searched.
__path__ = _pkgutil.extend_path(__path__, __name__)

# Keep Ray on loopback (DESIGN.md): Ray reads this once, when it is first imported.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `from cluster import Client` without importing Ray eagerly
    if name == "Client":
        from cluster.distributed.client import Client

        return Client
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
