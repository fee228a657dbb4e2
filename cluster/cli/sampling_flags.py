"""The command line's sampling flags (``run``, ``generate``): one flag per ``SamplingParams`` field.

The flags carry no bounds of their own: ``params_from_flags`` builds the params and reports a
``SamplingParamError`` under the flag's name, so the bounds stay where they are defined
(``cluster.engine.sampling``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cluster.engine.sampling import SamplingParamError, SamplingParams, TokenLogprob, parse_logit_bias


def logprob_json(entry: TokenLogprob) -> dict[str, Any]:
    """A TokenLogprob as JSON: token id, the text it added to the answer (``TokenLogprob.text``),
    its bytes, log-probability and the alternatives."""
    return {"token": entry.token, "text": entry.text, "bytes": list(entry.piece), "logprob": entry.logprob,
            "top": [{"token": t.token, "text": t.text, "bytes": list(t.piece), "logprob": t.logprob}
                    for t in entry.top]}


_SAMPLING_FLAGS = {  # SamplingParams field -> its flag; bounds are SamplingParams.validate's
    "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty", "penalty_last_n": "--repeat-last-n", "logit_bias": "--logit-bias",
    "seed": "--seed", "stop": "--stop", "n": "--n", "top_logprobs": "--logprobs", "logprobs": "--logprobs",
    "grammar": "--grammar",
}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (bounds as in cluster/engine/sampling.py)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repeat-last-n", type=int, default=64, help="generated tokens the penalties look at")
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN=BIAS", help="repeatable; -100 bans")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="a stop string; repeatable (at most 4)")
    g.add_argument("--n", type=int, default=1, help="choices")
    g.add_argument("--logprobs", type=int, metavar="N", help="token log-probabilities, with the N likeliest alternatives")
    structured = g.add_mutually_exclusive_group()
    structured.add_argument("--grammar", metavar="FILE", help="a GBNF grammar the output must follow")
    structured.add_argument("--json-schema", metavar="FILE", help="a JSON schema the output must validate against")


def params_from_flags(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags; a bad value is reported under its flag."""
    grammar = None
    if args.grammar:
        grammar = Path(args.grammar).read_text(encoding="utf-8")
    elif args.json_schema:
        from cluster.engine.grammar import json_schema_grammar

        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema: {args.json_schema} is not JSON: {exc}") from None
        grammar = json_schema_grammar(schema, param="--json-schema")
    try:
        return SamplingParams.create(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repeat_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, penalty_last_n=args.repeat_last_n,
            logit_bias=parse_logit_bias(args.logit_bias), seed=args.seed, stop=tuple(args.stop), n=args.n,
            logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0, grammar=grammar)
    except SamplingParamError as exc:
        raise ValueError(f"{_SAMPLING_FLAGS.get(exc.field, exc.field)} must be {exc.expected}, got {exc.value!r}") from None
