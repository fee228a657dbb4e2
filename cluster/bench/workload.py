"""Routing-benchmark workloads: multi-turn conversations with Poisson arrivals (JSONL or synthetic).

A workload is a list of turns in arrival order. Turns that share a conversation are sent one
after another: a turn is sent at its arrival time or when the conversation's previous turn
finished, whichever is later. What is sent for a turn is the conversation so far — every
earlier turn's prompt followed by the answer the service gave it — then the new prompt
(``conversation_prompt``, the one rule used by the live benchmark and the simulator).

JSONL format, one request per line (blank lines are skipped)::

    {"prompt": " kalo meni ...", "session": "c0001", "domain": "topic2"}

``prompt`` (non-empty string) is required; ``session`` (string or integer) groups lines into
one conversation, successive turns in file order — a line without it is a conversation of
its own; ``domain`` (string) is a free label carried into the results. Any other key is an
error, so a typo is not silently ignored.

Synthetic workloads (for models written by ``cluster.models.synth``): each conversation is on one
topic and has 2-4 turns, each turn a ``topic_prompt`` of ``words_per_turn`` words; at most
``max_open`` conversations are open at once and each arrival goes to a random open one, so
conversations interleave; an optional mixed-topic preamble, the same text for every
conversation, opens each first turn (a shared system prompt). Same seed, same workload.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

JSONL_KEYS = ("prompt", "session", "domain")


@dataclass(frozen=True)
class Turn:
    """One request of a workload.

    Attributes:
        conversation: conversation id (the ``session_id`` sent with the request).
        index: 0 for a conversation's first turn, then 1, 2, ...
        prompt: this turn's new text (without the conversation so far).
        arrival_s: when it may be sent, seconds after the run starts.
        domain: free label (the topic, for synthetic workloads).
    """

    conversation: str
    index: int
    prompt: str
    arrival_s: float
    domain: str | None = None


@dataclass(frozen=True)
class Workload:
    """Turns in arrival order, and how they were made."""

    turns: tuple[Turn, ...]
    source: str
    rate: float
    seed: int

    def conversations(self) -> dict[str, list[Turn]]:
        """Turns grouped by conversation, each list in turn order (dict in first-arrival order)."""
        out: dict[str, list[Turn]] = {}
        for turn in self.turns:
            out.setdefault(turn.conversation, []).append(turn)
        return out

    def describe(self) -> dict[str, object]:
        convs = self.conversations()
        lengths = [len(turns) for turns in convs.values()]
        return {
            "source": self.source,
            "n_requests": len(self.turns),
            "n_conversations": len(convs),
            "turns_per_conversation": {str(n): lengths.count(n) for n in sorted(set(lengths))},
            "rate_per_s": self.rate,
            "seed": self.seed,
            "duration_s": self.turns[-1].arrival_s if self.turns else 0.0,
            "mean_prompt_words": float(np.mean([len(t.prompt.split()) for t in self.turns])) if self.turns else 0.0,
            "domains": sorted({t.domain for t in self.turns if t.domain is not None}),
        }

    def head(self, n_requests: int) -> "Workload":
        """The first ``n_requests`` turns (conversations cut short keep their first turns)."""
        return Workload(self.turns[:n_requests], self.source, self.rate, self.seed)


def conversation_prompt(history: Sequence[tuple[str, str]], prompt: str) -> str:
    """What is sent for a turn: each earlier (prompt, answer) pair, then the new prompt, concatenated."""
    return "".join(p + a for p, a in history) + prompt


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """``n`` arrival times (seconds, increasing, the first after 0) of a Poisson process of ``rate``/s."""
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"rate must be a finite number of requests per second > 0, got {rate!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gaps = np.random.default_rng([seed, 0xA11]).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps)


# -- JSONL -----------------------------------------------------------------------------------

def parse_jsonl(lines: Iterable[str], source: str = "<jsonl>") -> list[dict[str, str | None]]:
    """Validated records ``{"prompt", "session", "domain"}`` (None where absent), in file order.

    Raises:
        ValueError: naming ``source:line`` and what is wrong with that line, or an empty file.
    """
    records: list[dict[str, str | None]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"prompt\", got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(JSONL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(JSONL_KEYS)}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
        session = obj.get("session")
        if session is not None:
            if isinstance(session, bool) or not isinstance(session, (str, int)) or session == "":
                raise ValueError(f"{where}: \"session\" must be a non-empty string or an integer, got {session!r}")
            session = str(session)
        domain = obj.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"{where}: \"domain\" must be a string, got {domain!r}")
        records.append({"prompt": prompt, "session": session, "domain": domain})
    if not records:
        raise ValueError(f"{source}: no requests (every line is blank)")
    return records


def load_jsonl(path: str | os.PathLike[str], *, rate: float, seed: int = 0) -> Workload:
    """Reads a JSONL workload; arrivals are a Poisson process of ``rate``/s in file order.

    Raises:
        ValueError: missing file, or a malformed line (named with its number).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"workload file not found: '{path}'")
    with path.open(encoding="utf-8") as f:
        records = parse_jsonl(f, str(path))
    arrivals = poisson_arrivals(len(records), rate, seed)
    turns, counts = [], {}
    for i, (record, arrival) in enumerate(zip(records, arrivals, strict=True)):
        conversation = record["session"] if record["session"] is not None else f"line{i + 1}"
        index = counts.get(conversation, 0)
        counts[conversation] = index + 1
        turns.append(Turn(conversation, index, str(record["prompt"]), float(arrival), record["domain"]))
    return Workload(tuple(turns), str(path), rate, seed)


def dump_jsonl(workload: Workload, path: str | os.PathLike[str]) -> None:
    """Writes the workload's turns as JSONL (arrival order), readable by ``load_jsonl``."""
    with open(path, "w", encoding="utf-8") as f:
        for t in workload.turns:
            record = {"prompt": t.prompt, "session": t.conversation}
            if t.domain is not None:
                record["domain"] = t.domain
            f.write(json.dumps(record) + "\n")


# -- synthetic -------------------------------------------------------------------------------

def synthetic(topics: Sequence[Sequence[str]], n_requests: int, *, rate: float, seed: int = 0,
              words_per_turn: int = 20, min_turns: int = 2, max_turns: int = 4, max_open: int = 4,
              preamble_words: int = 0) -> Workload:
    """Topic conversations for a ``cluster.models.synth`` model (see the module docstring).

    Args:
        topics: the model's topics (``synth.read_topics``).
        n_requests: turns in all (the last conversations may end early).
        rate: Poisson arrival rate, requests per second.
        seed: same seed, same prompts, order and arrivals.
        words_per_turn: words of each turn's topic prompt.
        min_turns, max_turns: turns per conversation, drawn uniformly.
        max_open: conversations open at once (interleaving).
        preamble_words: words of the shared mixed-topic preamble (0: none).

    Raises:
        ValueError: a parameter out of range.
    """
    from cluster.models import synth

    if n_requests < 1:
        raise ValueError(f"n_requests must be >= 1, got {n_requests}")
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"turns per conversation: need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    if max_open < 1 or words_per_turn < 1 or preamble_words < 0:
        raise ValueError("max_open and words_per_turn must be >= 1 and preamble_words >= 0")
    if not topics:
        raise ValueError("the model has no topics")
    rng = np.random.default_rng([seed, 0x70C])
    preamble = ""
    if preamble_words:
        per_topic = max(1, preamble_words // len(topics))
        preamble = synth.mixed_prompt(topics, list(range(len(topics))), per_topic, seed=seed + 1)
    # Plan the conversations first (topics in shuffled cycles, lengths uniform; the last one is
    # cut so the turns add up to n_requests), then interleave them through max_open slots.
    planned: list[tuple[int, int]] = []  # (topic, turns)
    topic_cycle: list[int] = []
    while sum(n for _, n in planned) < n_requests:
        if not topic_cycle:
            topic_cycle = [int(t) for t in rng.permutation(len(topics))]
        planned.append((topic_cycle.pop(), int(rng.integers(min_turns, max_turns + 1))))
    excess = sum(n for _, n in planned) - n_requests
    planned[-1] = (planned[-1][0], planned[-1][1] - excess)
    queue = list(enumerate(planned))[::-1]
    open_convs: list[list[int]] = []  # [conversation number, topic, turns left, next index]
    turns: list[Turn] = []
    for arrival in poisson_arrivals(n_requests, rate, seed):
        while len(open_convs) < max_open and queue:
            number, (topic, n_turns) = queue.pop()
            open_convs.append([number, topic, n_turns, 0])
        slot = int(rng.integers(len(open_convs)))
        conv = open_convs[slot]
        text = synth.topic_prompt(topics, conv[1], words_per_turn, seed=int(rng.integers(0, 2**31)))
        if conv[3] == 0 and preamble:
            text = preamble + text
        turns.append(Turn(f"c{conv[0]:04d}", conv[3], text, float(arrival), f"topic{conv[1]}"))
        conv[2] -= 1
        conv[3] += 1
        if conv[2] == 0:
            open_convs.pop(slot)
    return Workload(tuple(turns), "synthetic", rate, seed)


def for_model(model_path: str, prompts: str | None, n_requests: int, *, rate: float, seed: int = 0,
              max_open: int = 4, preamble_words: int = 0) -> Workload:
    """The workload of a benchmark: ``prompts`` (JSONL, cut to n_requests) or synthetic conversations.

    ``max_open`` and ``preamble_words`` apply to synthetic conversations (see ``synthetic``).

    Raises:
        ValueError: no ``prompts`` for a model that ``cluster.models.synth`` did not write.
    """
    if prompts:
        return load_jsonl(prompts, rate=rate, seed=seed).head(n_requests)
    from cluster.models import synth

    try:
        topics = synth.read_topics(model_path)
    except ValueError:
        raise ValueError(f"'{model_path}' has no synthetic topics to make prompts from; "
                         f"pass --prompts FILE.jsonl") from None
    return synthetic(topics, n_requests, rate=rate, seed=seed, max_open=max_open, preamble_words=preamble_words)


def topic_prompts(model_path: str, n: int = 16, n_words: int = 16) -> list[str]:
    """``n`` short prompts for a model: a synthetic model's topics in turn, else plain text."""
    from cluster.models import synth

    topics = synth.read_topics(model_path)
    if not topics:
        return [f"request {i} about the weather and the sea" for i in range(n)]
    return [synth.topic_prompt(topics, i % len(topics), n_words, seed=i) for i in range(n)]
