"""The HTTP API: the Ray Serve gateway, OpenAI request and response shapes, tool calls, metrics. Imports
cluster.distributed and what it may import.
"""
