"""A benchmark workload from the held-out corpus: multi-turn conversations of real text per domain.

``python -m cluster.train prompts --out trained`` writes ``trained/work/prompts.jsonl`` in the
benchmarks' JSONL format (``cluster.bench.workload``: ``{"prompt", "session", "domain"}`` per
line): for every domain, ``conversations`` held-out documents, each cut into ``turns`` pieces of
``chars_per_turn`` characters that follow each other in the document (a conversation's next turn
is the text that came next). Lines are in arrival order as users would send them: at most
``open_conversations`` conversations are open at once, each next line is the next turn of a
random open one (seeded), and a conversation that ends makes room for the next (taken over the
domains in turn). Not a fixed round-robin order over the conversations: with a number of
conversations divisible by the number of nodes, that order sent every turn of a conversation to
the same node under ``round_robin`` routing (every second turn came exactly one cycle of
conversations later), which read as perfect KV reuse for the baseline. ``bench engine --prompts`` and ``bench routing --prompts`` take
it; nothing here needs torch (the corpus stage must have run).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = "prompts.jsonl"
SINGLE_SHOT_FILE = "prompts-single.jsonl"


@dataclass(frozen=True)
class PromptsConfig:
    """How the workload is cut from the held-out documents."""

    conversations: int = 3  # per domain
    turns: int = 3  # per conversation
    chars_per_turn: int = 600
    single_shot: bool = False  # no conversations: every line a request of its own (no session)
    open_conversations: int = 6  # conversations open at once (arrivals interleave among them)
    seed: int = 0  # of the interleaving

    @property
    def file_name(self) -> str:
        return SINGLE_SHOT_FILE if self.single_shot else PROMPTS_FILE

    def validate(self) -> None:
        for name in ("conversations", "turns", "chars_per_turn", "open_conversations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PromptsConfig.{name} must be an integer >= 1, got {value!r}")


def write_prompts(work: Path, config: PromptsConfig = PromptsConfig()) -> Path:
    """Writes ``work/prompts.jsonl`` (``single_shot``: ``work/prompts-single.jsonl``, each turn a
    request of its own) from ``work/corpus/<domain>.heldout.jsonl``; returns its path.

    The domains are those the corpus manifest lists, taken in the order of their file names (the
    order the first model's workload was written in); a folder without a manifest (a hand-made
    corpus) gives every held-out file there.

    Raises:
        FileNotFoundError: the corpus stage has not run (it says what to run).
    """
    config.validate()
    corpus = work / "corpus"
    if (corpus / "manifest.json").exists():
        from cluster.train.corpus import corpus_domains

        sources = sorted(corpus / f"{domain}.heldout.jsonl" for domain in corpus_domains(work))
    else:
        sources = sorted(corpus.glob("*.heldout.jsonl"))
    if not sources:
        raise FileNotFoundError(f"no held-out corpus under {corpus}; run: python -m cluster.train corpus --out "
                                f"{work.parent}")
    conversations: list[list[dict[str, str]]] = []
    need = config.turns * config.chars_per_turn
    for source in sources:
        domain = source.name.removesuffix(".heldout.jsonl")
        taken = 0
        with source.open(encoding="utf-8") as f:
            for number, line in enumerate(f):
                text = json.loads(line)["text"]
                if len(text) < need:
                    continue  # a conversation needs a document long enough for all its turns
                session = {} if config.single_shot else {"session": f"{domain}-{number}"}
                conversations.append([{"prompt": text[i * config.chars_per_turn:(i + 1) * config.chars_per_turn],
                                       **session, "domain": domain} for i in range(config.turns)])
                taken += 1
                if taken == config.conversations:
                    break
    path = work / config.file_name
    with path.open("w", encoding="utf-8") as f:
        for line in _arrival_order(conversations, config.open_conversations, config.seed):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def _arrival_order(conversations: list[list[dict[str, str]]], n_open: int, seed: int) -> list[dict[str, str]]:
    """Every turn once, each conversation's in order: the next line is the next turn of a random one of at most
    ``n_open`` open conversations; waiting conversations open in order over the domains in turn (the first of
    every domain, then the second...)."""
    by_domain: dict[str, list[list[dict[str, str]]]] = {}
    for conversation in conversations:
        by_domain.setdefault(conversation[0]["domain"], []).append(conversation)
    waiting = [c[i] for i in range(max(map(len, by_domain.values()), default=0)) for c in by_domain.values()
               if i < len(c)]
    rng, opened, lines = random.Random(seed), [], []
    while waiting or opened:
        while waiting and len(opened) < n_open:
            opened.append(list(waiting.pop(0)))
        conversation = opened[rng.randrange(len(opened))]
        lines.append(conversation.pop(0))
        if not conversation:
            opened.remove(conversation)
    return lines
