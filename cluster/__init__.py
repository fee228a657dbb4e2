"""Expert Sniper Cluster: serving big Mixture-of-Experts GGUF models on modest machines.

Each node runs llama.cpp with a native expert cache (``cluster.cache``) that keeps the hot
experts resident under a byte budget; ``cluster.engine`` is one such node's engine.
"""

__version__ = "0.1.0"
