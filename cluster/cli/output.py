"""How a command's result reaches standard output: one line of JSON with --json, else its summary."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def emit(result: dict[str, Any], args: argparse.Namespace, summary: Callable[[dict[str, Any]], str]) -> None:
    """The command's result on standard output: one line of JSON with --json, else its summary."""
    print(json.dumps(result) if args.json else summary(result), file=args.result_stream)
