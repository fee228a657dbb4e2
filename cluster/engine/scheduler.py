"""The engine's step loop: continuous batching of up to ``n_slots`` sequences on one llama.cpp context.

A thread of its own runs the steps. Each step evaluates one token of every decoding sequence,
then chunks of waiting prompts (chunked prefill, oldest first), in one ``llama_decode`` of one
ubatch, then samples each sequence that produced logits with its own sampler chain; requests
join at the next step and end on their own. Under a cache budget below the model's experts,
how many run together adapts to what the cache sustains (``cluster.engine.batch_width``) and a
batch takes sequences expected to need the same experts (``cluster.engine.batch_admission``);
the others wait. Everything that touches the llama.cpp context or the cache runs on that thread
(``call``).

What a step does per sequence in Python is kept small: the batch is written through numpy views
of llama.cpp's arrays, greedy sequences take their tokens from one vectorised pass over the
batch's logits (``SamplerChains.argmax_tokens``) and token pieces come from a table
(``cluster.engine.token_table``). A sequence emits its piece as soon as it is sampled, so the
caller it wakes runs while the step loop is in Python anyway, not during the next
``llama_decode``, whose threads take every core by default.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import llama_cpp
import numpy as np

from cluster.engine.batch_admission import ExpertAdmission
from cluster.engine.batch_width import BatchWidth
from cluster.engine.cache import RoutingTrace, cache_stats
from cluster.engine.engine_config import EngineConfig
from cluster.engine.generation import Generation
from cluster.engine.kv_state import KvState
from cluster.engine.llama_context import LlamaModelContext
from cluster.engine.request_check import CheckedRequest
from cluster.engine.sampler_chain import SamplerChains
from cluster.engine.sequence import CANCELLED, Cancelled
from cluster.engine.sequence import Sequence as SequenceHandle
from cluster.engine.token_table import TokenTable
from cluster.errors import EngineClosedError

log = logging.getLogger(__name__)


@dataclass
class BatchTotals:
    """Sums over the engine's steps (``Scheduler.batch_stats``)."""

    steps: int = 0
    rows: int = 0
    decoding: int = 0
    decode_steps: int = 0
    sequences: int = 0
    seconds: float = 0.0

    def note(self, rows: int, decoding: int, sequences: int, seconds: float) -> None:
        self.steps += 1
        self.rows += rows
        self.decoding += decoding
        self.decode_steps += decoding > 0
        self.sequences += sequences
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"tokens_per_step": self.rows / self.steps, "sequences_per_step": self.sequences / self.steps,
                "decode_batch": self.decoding / self.decode_steps if self.decode_steps else 0.0,
                "step_ms": 1000 * self.seconds / self.steps}


class Scheduler:
    """The step loop of one engine (see module docstring); ``stop`` ends it."""

    def __init__(self, model: LlamaModelContext, kv: KvState, samplers: SamplerChains, tokens: TokenTable,
                 config: EngineConfig) -> None:
        self._model = model
        self._kv = kv
        self._samplers = samplers
        self._tokens = tokens
        self._ctx = model.ctx.ctx
        self._n_ctx = model.n_ctx
        self._n_batch = model.n_batch
        self._n_slots = config.n_slots
        self._cv = threading.Condition()
        self._closing = False
        self._waiting: deque[SequenceHandle] = deque()
        self._running: list[SequenceHandle] = []
        self._calls: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._finished: list[tuple[SequenceHandle, Any]] = []
        self._outputs: list[tuple[SequenceHandle, int]] = []
        self._chunks: list[tuple[SequenceHandle, int]] = []
        self._next_tag = 0
        self._unsettled = False
        # under a budget below the model's experts, how many sequences run together adapts to the cache
        pressured = model.pressured
        self._width = BatchWidth(config.n_slots, pressured=pressured and config.adaptive_width)
        admit = pressured and config.expert_admission and config.n_slots > 1
        self._admission = ExpertAdmission(max_passes=config.n_slots) if admit else None
        self._bytes_read = 0
        self._row_tags = np.zeros(self._n_batch, dtype=np.int32)
        self._row_outputs = np.zeros(self._n_batch, dtype=np.uint8)
        # the step's batch, written through numpy views of llama.cpp's arrays (this is their only writer)
        batch = model.batch.batch
        self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(self._n_batch,))
        self._batch_pos = np.ctypeslib.as_array(batch.pos, shape=(self._n_batch,))
        self._batch_logits = np.ctypeslib.as_array(batch.logits, shape=(self._n_batch,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self._n_batch,))[:] = 1  # each row: one sequence
        self._batch_seq_id = [batch.seq_id[row] for row in range(self._n_batch)]  # each row's own array
        self._row_slots = np.full(self._n_batch, -1, dtype=np.int32)  # the slot in each row's seq_id now
        self._step_slots = np.zeros(self._n_batch, dtype=np.int32)
        self._totals = BatchTotals()
        self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)
        self._thread.start()

    # -- other threads ---------------------------------------------------------------------------

    def submit(self, request: CheckedRequest, session: str | None,
               emit: Callable[[Any], None] | None) -> SequenceHandle:
        """Puts a checked request in the waiting queue; it joins the batch at a next step."""
        with self._cv:
            if self._closing:
                request.sampler.close()
                raise EngineClosedError("the engine was closed")
            self._next_tag += 1
            seq = SequenceHandle(self._next_tag, request.tokens, request.params, request.sampler, session,
                                 self._tokens.pieces(request.params.preserved_token_ids), emit, request.resume)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def submit_all(self, requests: list[tuple[CheckedRequest, str | None, Callable[[Any], None] | None]]
                   ) -> list[SequenceHandle]:
        """Submits ``(request, session, emit)`` triples at once: the step loop admits waiting
        requests under the same lock, so all of them or none are waiting when it looks."""
        with self._cv:
            return [self.submit(request, session, emit) for request, session, emit in requests]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the step loop's thread between two steps and returns its result."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list[Any] = []
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine was closed")
            self._calls.append((fn, box, done))
            self._cv.notify_all()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[1]

    def stop(self) -> None:
        """Ends every request (``EngineClosedError``) and the loop; returns once it has ended
        (at once when called from the loop's own thread)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def n_running(self) -> int:
        """Sequences in the batch or waiting for a slot."""
        with self._cv:
            return len(self._running) + len(self._waiting)

    def batch_stats(self) -> dict[str, float]:
        """See ``MoEEngine.batch_stats``."""
        totals = self._totals
        stats: dict[str, float] = {"slots": self._n_slots, "slots_busy": len(self._running),
                                   "width": self._width.width, "waiting": len(self._waiting), "steps": totals.steps,
                                   "decode_steps": totals.decode_steps, "decode_rows": totals.decoding}
        stats.update(totals.means())
        if self._admission is not None:
            stats["reordered"] = self._admission.reordered
            stats["held"] = self._admission.held
        cache = self._model.cache
        if cache is not None and totals.steps:
            c = cache.counters()  # counters are read without the step loop: a consistent-enough sum
            selected = c["n_hits_prefill"] + c["n_hits_decode"] + c["n_misses_prefill"] + c["n_misses_decode"]
            stats["experts_per_step"] = selected / max(1, c["n_steps"])
        return stats

    # -- the loop's thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._calls or self._waiting or self._running):
                    self._cv.wait()
                calls, self._calls = self._calls, []
                closing = self._closing
            for fn, box, done in calls:
                try:
                    box[:] = [None, fn()]
                except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                    box[:] = [exc]
                done.set()
            if closing:
                with self._cv:
                    left, self._waiting = [*self._running, *self._waiting], deque()
                    self._running = []
                    late, self._calls = self._calls, []
                for _, box, done in late:  # asked for after the last round of calls
                    box[:] = [EngineClosedError("the engine was closed")]
                    done.set()
                for seq in left:
                    seq.sampler.close()
                    seq.emit(EngineClosedError("the engine was closed"))
                return
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001  (an engine-wide failure fails what was running)
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._end(seq, exc, keep=False)
                self._deliver()

    def _step(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._end(seq, CANCELLED, keep=False)
        with self._cv:
            while self._waiting and self._kv.n_free and len(self._running) < self._width.width:
                seq = self._next_waiting()
                if seq is None:
                    break
                if seq.cancelled:
                    seq.sampler.close()
                    seq.emit(CANCELLED)
                    continue
                self._start(seq)
        if not self._running:
            self._deliver()
            return
        t0 = time.perf_counter()
        rows, n_decoding = self._fill_batch()
        cache = self._model.cache
        rc = self._decode(rows)
        if rc != 0:
            error = RuntimeError(f"llama_decode failed with code {rc} ({len(self._running)} sequences in the step)")
            for seq in list(self._running):
                self._end(seq, error, keep=False)
        else:
            self._after_decode()
        if self._width.pressured:
            c = cache.counters()
            read = c["bytes_read_prefill"] + c["bytes_read_decode"]
            self._width.note(len(self._outputs), read - self._bytes_read)
            self._bytes_read = read
        self._unsettled = True
        self._totals.note(rows, n_decoding, len(self._running) + len(self._finished), time.perf_counter() - t0)
        self._deliver()

    def _decode(self, rows: int) -> int:
        """Tells the cache which sequence each of the batch's first ``rows`` rows is and which give
        logits, then evaluates them in one ``llama_decode``; returns its code."""
        cache = self._model.cache
        if cache is not None:
            cache.begin_step(self._row_tags[:rows], self._row_outputs[:rows])
        return llama_cpp.llama_decode(self._ctx, self._model.batch.batch)

    def new_tag(self) -> int:
        """A sequence tag no request has (the cache keeps a record per tag)."""
        with self._cv:
            self._next_tag += 1
            return self._next_tag

    def decode_alone(self, slot: int, tag: int, token: int, pos: int) -> None:
        """One step of one token, outside the requests (``cluster.engine.scoring``): ``token`` at
        ``pos`` of sequence ``slot`` (cache tag ``tag``), with logits (the batch's row 0). The
        step goes the way ``_step`` goes (the batch, then the cache told of the step, then
        ``llama_decode``). Runs on the loop's thread while no request runs (``call``).

        Raises:
            RuntimeError: llama_decode failed.
        """
        self._batch_tokens[0] = token
        self._batch_pos[0] = pos
        self._batch_logits[0] = 1
        self._row_tags[0] = tag
        self._row_outputs[0] = 1
        self._step_slots[0] = slot
        self._write_seq_ids(1)
        rc = self._decode(1)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (one token at position {pos})")
        cache = self._model.cache
        if self._width.pressured:  # the next request step's reads are its own
            c = cache.counters()
            self._bytes_read = c["bytes_read_prefill"] + c["bytes_read_decode"]
        self._unsettled = True

    def _next_waiting(self) -> SequenceHandle | None:
        """The waiting sequence to start now: the oldest, or under memory pressure the one
        that fits the running batch's experts, if any (``cluster.engine.batch_admission``)."""
        if self._admission is None:
            return self._waiting.popleft()
        batch = self._running[0].prompt if self._running else None
        index = self._admission.pick(self._waiting, self._model.cache.warmth()[0], batch)
        if index is None:
            return None
        seq = self._waiting[index]
        del self._waiting[index]
        return seq

    def _start(self, seq: SequenceHandle) -> None:
        """Gives a waiting sequence a slot and the longest KV prefix it can have (``kv_state``)."""
        seq.slot, n_reused = self._kv.start(seq.prompt, seq.session)
        seq.n_reused = seq.n_evaluated = n_reused
        seq.started_at = time.perf_counter()
        self._running.append(seq)

    def _fill_batch(self) -> tuple[int, int]:
        """One token of every decoding sequence, then prompt chunks (oldest first) up to the step's
        budget; returns the rows and the decoding sequences. Each sequence's rows are contiguous
        (the cache needs it)."""
        self._outputs.clear()
        self._chunks.clear()
        tokens, pos, logits, tags, outputs, slots = (self._batch_tokens, self._batch_pos, self._batch_logits,
                                                     self._row_tags, self._row_outputs, self._step_slots)
        decoding = [seq for seq in self._running if seq.decoding]
        rows = len(decoding)
        if rows:
            tokens[:rows] = [seq.pending for seq in decoding]
            pos[:rows] = [len(seq.slot.tokens) for seq in decoding]
            tags[:rows] = [seq.tag for seq in decoding]
            slots[:rows] = [seq.slot.index for seq in decoding]
            logits[:rows] = 1
            outputs[:rows] = 1
            self._outputs.extend(zip(decoding, range(rows)))
        n_decoding = rows
        for seq in self._running:
            if seq.decoding or rows >= self._n_batch:
                continue
            chunk = min(seq.n_prompt_left, self._n_batch - rows)
            start, end = seq.n_evaluated, rows + chunk
            self._chunks.append((seq, chunk))
            tokens[rows:end] = seq.prompt[start:start + chunk]
            pos[rows:end] = np.arange(start, start + chunk)
            tags[rows:end] = seq.tag
            slots[rows:end] = seq.slot.index
            last = start + chunk == len(seq.prompt)  # the prompt's last token: its logits start the answer
            logits[rows:end] = 0
            outputs[rows:end] = 0
            if last:
                logits[end - 1] = 1
                outputs[end - 1] = 1
                self._outputs.append((seq, end - 1))
            rows = end
        self._write_seq_ids(rows)
        return rows, n_decoding

    def _write_seq_ids(self, rows: int) -> None:
        """The batch holds ``rows`` rows, each of the sequence ``_step_slots`` names (written where it changed)."""
        slots = self._step_slots
        for row in np.flatnonzero(self._row_slots[:rows] != slots[:rows]).tolist():  # rows whose sequence changed
            self._batch_seq_id[row][0] = int(slots[row])
        self._row_slots[:rows] = slots[:rows]
        self._model.batch.batch.n_tokens = rows

    def _after_decode(self) -> None:
        for seq, _ in self._outputs:  # what the step put in each slot's KV
            if seq.decoding:
                seq.slot.tokens.append(seq.pending)
        for seq, n in self._chunks:
            seq.slot.tokens.extend(seq.prompt[seq.n_evaluated:seq.n_evaluated + n])
            seq.n_evaluated += n
        samplers, table = self._samplers, self._tokens
        greedy = [j for j, (seq, _) in enumerate(self._outputs) if samplers.is_plain_greedy(seq.params)]
        picked = dict(zip(greedy, samplers.argmax_tokens(len(self._outputs), greedy))) if greedy else {}
        for j, (seq, row) in enumerate(self._outputs):
            if seq.pending is None and seq.prompt_done_at is None:
                seq.prompt_done_at = time.perf_counter()
                if self._admission is not None:
                    self._learn_kind(seq)
            try:
                token = picked[j] if j in picked else samplers.sample(seq.sampler, row)
                logprob = (lambda offset, t=token, r=row, s=seq: samplers.logprob(t, offset, s.params.top_logprobs, r,
                                                                                      s.params.preserved_token_ids)) \
                    if seq.params.logprobs else None
                done = seq.accept(token, table.is_eog(token), logprob, len(seq.slot.tokens) + 1 > self._n_ctx)
            except Exception as exc:  # noqa: BLE001  (this sequence fails; the others go on)
                self._end(seq, exc, keep=False)
                continue
            if done:
                self._end(seq, None, keep=True)

    def _learn_kind(self, seq: SequenceHandle) -> None:
        """Admission learns the experts a prompt selected, as soon as its prefill has ended."""
        layout = self._model.layout
        trace = RoutingTrace.from_native(self._model.cache.sequence_trace(seq.tag))
        self._admission.learn(trace.summary(seq.prompt[seq.n_reused:], layout.n_layers, layout.n_experts))

    def _end(self, seq: SequenceHandle, outcome: BaseException | Cancelled | None, keep: bool) -> None:
        """Takes a sequence out of the batch; its result is delivered after the step (``_deliver``)."""
        self._running.remove(seq)
        seq.sampler.close()
        cache = self._model.cache
        record = cache.take_sequence(seq.tag) if cache is not None else None
        self._kv.release(seq.slot, keep)
        if outcome is not None:
            self._finished.append((seq, outcome))
            return
        seq.flush()
        end = time.perf_counter()
        stats: dict[str, float] = {}
        counts = trace = None
        if record is not None:
            stats = cache_stats(cache, record.counters)
            trace = RoutingTrace.from_native(record.trace)
            counts = trace.expert_counts(self._model.layout.n_layers, self._model.layout.n_experts)
        prompt_done = seq.prompt_done_at or end
        result = Generation(text=seq.text, tokens=tuple(seq.generated), n_prompt_tokens=len(seq.prompt),
                            n_resumed=seq.n_resumed,
                            finish_reason=seq.finish_reason or "length",
                            prefill_s=prompt_done - (seq.started_at or prompt_done), decode_s=end - prompt_done,
                            cache=stats, expert_counts=counts, trace=trace, n_reused_tokens=seq.n_reused,
                            logprobs=tuple(seq.logprobs) if seq.params.logprobs else None,
                            queued_s=(seq.started_at or end) - seq.submitted_at)
        self._finished.append((seq, result))

    def _deliver(self) -> None:
        """Hands finished sequences their results; when the batch is empty, settles the cache first
        (reads in flight land, the budget is trimmed, the kernel's view reconciled), so that what a
        caller asks the cache after its request sees it settled."""
        if not self._finished:
            return
        cache = self._model.cache
        if cache is not None and self._unsettled and not self._running and not self._waiting:
            cache.settle()
            self._unsettled = False
        finished, self._finished = self._finished, []
        for seq, outcome in finished:
            seq.emit(outcome)
