"""Models made here: synthetic GGUF files (synth). Imports cluster.engine and cluster.errors.
"""
