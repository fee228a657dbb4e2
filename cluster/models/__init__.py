"""Models made here: synthetic GGUF files (synth: writing and reading the file; synth_config, synth_vocab and
synth_weights: the config, the vocabulary and the tensors). Imports cluster.engine and cluster.errors.
"""
