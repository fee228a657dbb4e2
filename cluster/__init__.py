"""Expert Sniper Cluster: serving big Mixture-of-Experts GGUF models on modest machines.

Each node runs llama.cpp with a native expert cache (``cluster.cache``) that keeps the hot
experts resident under a byte budget; ``cluster.engine`` is one such node's engine.
"""

import os as _os

# Keep Ray on loopback (DESIGN.md): Ray reads this once, when it is first imported.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
