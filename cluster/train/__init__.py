"""Training a small Mixture-of-Experts model on text found on this machine (optional extra `train`).

The subpackage builds a five-domain text corpus (`corpus`), trains a byte-level BPE tokenizer
(`tokenizer`), trains a `qwen3moe`-shaped MoE transformer with PyTorch on CPU (`model`,
`train`), writes it as a GGUF file (`export`), checks llama.cpp against PyTorch (`verify`) and
summarises its learned routing (`routing`). Entry point: ``python -m cluster.train``.

Nothing outside this subpackage imports it, and importing it imports neither torch nor
tokenizers: the modules that need them import them themselves, so the package, its tests and
CI work without the extra installed (``pip install .[train]`` brings torch and tokenizers).
"""
