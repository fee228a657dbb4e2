"""Closed-loop chat users over HTTP: each holds multi-turn conversations, one request at a time, as a person would.

User ``u``'s ``k``-th conversation is about topic ``(u + k) mod n_topics`` and lasts ``turns`` turns; a turn's
prompt is the conversation so far (``workload.conversation_prompt``) and a new topic prompt, sent to
``/v1/completions`` streamed (the gateway and ``llama-server`` both serve it), greedy, ``max_tokens`` long. Every
streamed piece's arrival time is kept, so a window's tok/s counts the tokens that arrived inside it, whether or
not their request ended there; a request still waiting for its first token when the run ends is censored: its
time to first token is at least what it waited. Requests are cut at the run's end (the reader gives up then).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import requests

from cluster.bench.workload import conversation_prompt


@dataclass
class RequestRecord:
    """One request as its user saw it (times on ``time.perf_counter``'s clock)."""

    user: int
    conversation: int
    turn: int
    prompt_chars: int
    sent: float
    first: float | None = None  # first text piece
    end: float | None = None  # last byte of a request that ended (None: cut at the run's end, or failed)
    pieces: list[float] = field(default_factory=list)  # arrival of each text piece
    tokens: int = 0  # usage.completion_tokens when the server sent it, else the pieces counted
    error: str | None = None

    def token_times(self) -> list[float]:
        """Arrival time of each token (a piece that carried several tokens spreads them evenly over its pieces)."""
        n = len(self.pieces)
        if not self.tokens or self.tokens == n:
            return list(self.pieces)
        return [self.pieces[min(n - 1, i * n // self.tokens)] for i in range(self.tokens)]


def _stream(session: requests.Session, url: str, body: dict, headers: dict[str, str], record: RequestRecord,
            deadline: float) -> str:
    """Sends one request and reads its pieces until it ends or ``deadline``; returns its text."""
    text: list[str] = []
    remaining = max(1.0, deadline - time.perf_counter())
    try:
        with session.post(f"{url}/v1/completions", json=body, headers=headers, stream=True,
                          timeout=(10, remaining)) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return ""
            for line in response.iter_lines():
                now = time.perf_counter()
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if event.get("error"):
                        record.error = str(event["error"])[:200]
                        return ""
                    piece = "".join(c.get("text") or "" for c in event.get("choices", ()))
                    if piece:
                        record.first = record.first or now
                        record.pieces.append(now)
                        text.append(piece)
                    if event.get("usage"):
                        record.tokens = int(event["usage"].get("completion_tokens") or 0)
                elif line.strip() == b"data: [DONE]":
                    break
                if now > deadline:
                    return "".join(text)  # cut at the run's end
            record.end = time.perf_counter()
    except (requests.ConnectionError, requests.Timeout) as exc:
        if time.perf_counter() < deadline - 1.0:
            record.error = f"{type(exc).__name__}: {str(exc)[:160]}"
        return "".join(text)
    if not record.tokens:
        record.tokens = len(record.pieces)
    return "".join(text)


def run_chat_users(url: str, n_users: int, topic_prompts: Sequence[Sequence[str]], *, duration_s: float,
                   max_tokens: int, turns: int = 3, model: str = "model", headers: dict[str, str] | None = None,
                   extra_body: dict | None = None) -> list[RequestRecord]:
    """Runs ``n_users`` users for ``duration_s`` seconds; returns every request they sent.

    ``topic_prompts[t]`` are the prompts of topic ``t`` a user draws its turns from, in turn.
    """
    if n_users < 1 or turns < 1 or not topic_prompts or any(not p for p in topic_prompts):
        raise ValueError("chat users need n_users >= 1, turns >= 1 and prompts for every topic")
    deadline = time.perf_counter() + duration_s
    records: list[RequestRecord] = []
    lock = threading.Lock()
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra_body or {})}

    def user(u: int) -> None:
        session = requests.Session()
        conversation = 0
        while time.perf_counter() < deadline:
            topic = (u + conversation) % len(topic_prompts)
            history: list[tuple[str, str]] = []
            for turn in range(turns):
                prompts = topic_prompts[topic]
                asked = prompts[(u * turns + conversation * turns + turn) % len(prompts)]
                prompt = conversation_prompt(history, asked)
                record = RequestRecord(u, conversation, turn, len(prompt), time.perf_counter())
                with lock:
                    records.append(record)
                answer = _stream(session, url, {**body, "prompt": prompt}, headers or {}, record, deadline)
                if record.error or record.end is None:
                    if record.error:
                        time.sleep(0.5)  # a failing server is not hammered
                    break
                history.append((asked, answer))
            conversation += 1
            if time.perf_counter() >= deadline:
                break

    threads = [threading.Thread(target=user, args=(u,), name=f"chat-user-{u}", daemon=True) for u in range(n_users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 60)
    with lock:
        return list(records)
