"""The engine of one node, no Ray: llama.cpp's model and context, the step loop, sampling, KV slots, the
expert cache's binding, batch rules, tokenizer, chat templates and grammars. Imports only cluster.errors and
the native modules.
"""
