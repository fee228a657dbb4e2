"""The command line (python -m cluster, sniper): subcommands, the demo, status tables and plots. The top
layer: may import every other package.
"""
