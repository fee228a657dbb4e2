"""Benchmarks: engine overhead, bounded memory, cache policy (and, later, routing)."""
