"""MoEEngine on synthetic models: correctness with the cache, routing counts, residency, errors, streaming."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import observer
import pagecache
import pytest

from cluster.models import synth
from cluster.engine import warmth_report as warmth
from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import Generation, MoEEngine, Piece
from cluster.errors import (
    CacheBudgetError,
    EngineClosedError,
    InvalidParameterError,
    ModelFileError,
    PromptTooLongError,
)
from cluster.engine.sampling import SamplingParams

N_CTX = 256  # llama.cpp pads the context to a multiple of 256: ask for what we get
N_THREADS = 2  # engines and observer alike: the same numerics
ROOT = Path(__file__).resolve().parent.parent


def open_engine(path: os.PathLike[str] | str, cache_bytes: int | None = None, **kwargs: object) -> MoEEngine:
    kwargs.setdefault("n_ctx", N_CTX)
    kwargs.setdefault("n_threads", N_THREADS)
    return MoEEngine(path, cache_bytes, **kwargs)  # type: ignore[arg-type]


def budget_fraction(layout, fraction: float) -> int:
    return int(fraction * layout.expert_bytes)


def run_stream(gen: Iterator[str]) -> tuple[list[str], Generation]:
    pieces: list[str] = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return pieces, done.value


def assert_fresh_engine_works(path: Path, layout, topics: list[list[str]]) -> None:
    with open_engine(path, budget_fraction(layout, 0.4)) as engine:
        result = engine.generate(synth.topic_prompt(topics, 2, 3, seed=1), max_tokens=3)
    assert result.n_generated == 3 and result.text


@pytest.fixture(scope="module")
def cached_engine(tiny_model: Path, tiny_layout) -> Iterator[MoEEngine]:
    """One engine with a 40 % budget shared by the request-level tests."""
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4)) as engine:
        yield engine


# -- (a) the cache does not change what is computed ----------------------------------------


@pytest.mark.parametrize("model_fixture", ["tiny_model", "qwen_model"])
def test_greedy_text_is_identical_with_and_without_the_cache_under_evictions(
        request: pytest.FixtureRequest, model_fixture: str) -> None:
    path = request.getfixturevalue(model_fixture)
    layout = discover_layout(str(path))
    topics = synth.read_topics(path)
    prompts = [synth.mixed_prompt(topics, [0, 1, 2, 3], 4, seed=11), synth.topic_prompt(topics, 2, 6, seed=4)]
    with open_engine(path) as plain:
        assert not plain.has_cache
        expected = [plain.generate(p, max_tokens=32) for p in prompts]
    with open_engine(path, budget_fraction(layout, 0.4)) as cached:
        got = [cached.generate(p, max_tokens=32) for p in prompts]
    for want, have in zip(expected, got):
        assert have.tokens == want.tokens
        assert have.text == want.text
        assert have.n_generated == 32
    assert sum(g.cache["n_evictions"] for g in got) > 0, "the budget must force evictions"
    assert got[0].cache["n_evictions"] > 0


def test_a_cache_beside_another_engine_on_the_same_file_manages_only_its_own_mapping(
        tiny_model: Path, tiny_layout, tiny_topics: list[list[str]]) -> None:
    """Two engines on one file in one process (the overhead benchmark does this): the cached one
    must find the mapping its own load made, not count the other's pages as its own (which kept it
    from admitting any expert) or drop pages from under the other engine."""
    prompt = synth.topic_prompt(tiny_topics, 1, 8, seed=2)
    budget = budget_fraction(tiny_layout, 0.4)
    with open_engine(tiny_model) as plain:
        want = plain.generate(prompt, max_tokens=24)
        with open_engine(tiny_model, budget) as cached:
            assert cached.cache_stats()["resident_bytes"] >= 0.8 * budget, "the experts its load read were kept"
            got = cached.generate(prompt, max_tokens=24)
            full = discover_layout(str(tiny_model)).unit_bytes.sum()
            with open_engine(tiny_model, int(full)) as everything:
                assert warmth.decode(everything.warmth()).resident.all()
                everything.generate(prompt, max_tokens=8)
                assert everything.cache_stats()["n_predicted"] == 0, "every layer is resident: nothing to predict"
        assert plain.generate(prompt, max_tokens=24).text == want.text == got.text


def test_caches_of_several_engines_on_one_file_do_not_fight_over_its_pages(demo_model: Path) -> None:
    """Nodes on one machine share the model file's page cache: pages another engine maps cannot be
    dropped. Each cache must see that once and stop splitting folios for them, not read the file
    again and again (it re-read 200x the file and decoded 10x slower before)."""
    layout = discover_layout(str(demo_model))
    topics = synth.read_topics(demo_model)
    budget = budget_fraction(layout, 1 / 3)
    engines = [open_engine(demo_model, budget) for _ in range(3)]
    try:
        for round_ in range(2):
            for i, engine in enumerate(engines):
                engine.generate(synth.topic_prompt(topics, (i + round_) % 3, 12, seed=i), max_tokens=24)
        stats = [engine.cache_stats() for engine in engines]
    finally:
        for engine in engines:
            engine.close()
    file_bytes = os.path.getsize(demo_model)
    assert all(s["bytes_split_reread"] < file_bytes for s in stats), [s["bytes_split_reread"] for s in stats]
    assert sum(s["n_pages_held_elsewhere"] for s in stats) > 0, "the pages other engines map were seen as theirs"


# -- (b) routing counts against an independent observer ------------------------------------


def _expected_rows(n_prompt: int, n_generated: int, n_batch: int) -> tuple[int, int]:
    """Tokens seen by every layer but the last, and by the last (only output rows: the prompt's
    last token and each generated token fed back)."""
    fed = n_prompt + n_generated - 1
    return fed, n_generated


@pytest.mark.parametrize("model_fixture", ["tiny_model", "qwen_model"])
def test_expert_counts_of_a_short_prompt_match_an_independent_observer(
        request: pytest.FixtureRequest, model_fixture: str) -> None:
    path = request.getfixturevalue(model_fixture)
    layout = discover_layout(str(path))
    topics = synth.read_topics(path)
    prompt = synth.topic_prompt(topics, 1, 6, seed=5)
    with open_engine(path, budget_fraction(layout, 0.4), n_batch=64) as engine:
        result = engine.generate(prompt, max_tokens=12)
    seen = observer.observe(path, prompt, max_tokens=12, n_layers=layout.n_layers, n_experts=layout.n_experts,
                            n_ctx=N_CTX, n_batch=64, n_threads=N_THREADS)
    assert result.n_reused_tokens == 0  # a fresh context: the whole prompt was evaluated
    assert seen.tokens == result.tokens
    assert seen.saw_strided_view, "the observer must have read a strided (non-contiguous) ids view"
    np.testing.assert_array_equal(result.expert_counts, seen.counts)
    np.testing.assert_array_equal(result.trace.expert_counts(layout.n_layers, layout.n_experts), seen.counts)
    rows, last_rows = _expected_rows(result.n_prompt_tokens, result.n_generated, 64)
    k = layout.n_experts_used
    np.testing.assert_array_equal(seen.counts.sum(axis=1), [rows * k] * (layout.n_layers - 1) + [last_rows * k])


def test_expert_counts_of_a_multi_ubatch_prompt_match_an_independent_observer(tiny_model: Path, tiny_layout,
                                                                             tiny_topics: list[list[str]]) -> None:
    layout = tiny_layout
    prompt = synth.mixed_prompt(tiny_topics, [0, 1, 2, 3], 25, seed=3)
    with open_engine(tiny_model, budget_fraction(layout, 0.4), n_batch=16) as engine:
        result = engine.generate(prompt, max_tokens=8)
    assert result.n_prompt_tokens > 6 * 16, "the prompt must span several 16-token ubatches"
    assert result.n_reused_tokens == 0
    seen = observer.observe(tiny_model, prompt, max_tokens=8, n_layers=layout.n_layers, n_experts=layout.n_experts,
                            n_ctx=N_CTX, n_batch=16, n_threads=N_THREADS)
    assert seen.tokens == result.tokens
    assert seen.max_rows == 16 and seen.saw_strided_view
    assert int(result.trace.n_tokens.max()) == 16 and result.trace.n_dropped == 0
    np.testing.assert_array_equal(result.expert_counts, seen.counts)
    np.testing.assert_array_equal(result.trace.expert_counts(layout.n_layers, layout.n_experts), seen.counts)
    rows, last_rows = _expected_rows(result.n_prompt_tokens, result.n_generated, 16)
    k = layout.n_experts_used
    np.testing.assert_array_equal(seen.counts.sum(axis=1), [rows * k] * (layout.n_layers - 1) + [last_rows * k])


# -- (c) the budget holds in the page cache ------------------------------------------------


def _distinct_expert_pages_resident(path: Path, layout) -> int:
    pages = pagecache.resident_pages(path)
    ps = pagecache.PAGE_SIZE
    touched = np.zeros_like(pages)
    for layer in range(layout.n_layers):
        for expert in range(layout.n_experts):
            for offset, size, _, _ in layout.unit_slices(layer, expert):
                touched[offset // ps:(offset + size + ps - 1) // ps] = True
    return int((pages & touched).sum()) * ps


@pytest.fixture()
def residency_engine(private_tiny_model: Path) -> Iterator[tuple[MoEEngine, Path, object, int]]:
    """An engine with a 30 % budget on a model copy nothing else maps, loaded from a cold page cache."""
    layout = discover_layout(str(private_tiny_model))
    budget = budget_fraction(layout, 0.3)
    pagecache.drop_file(private_tiny_model)
    with open_engine(private_tiny_model, budget) as engine:
        yield engine, private_tiny_model, layout, budget


def _decode_a_while(engine: MoEEngine, path: Path) -> Generation:
    topics = synth.read_topics(path)
    result = engine.generate(synth.mixed_prompt(topics, [0, 1, 2, 3], 5, seed=2), max_tokens=24)
    assert result.cache["n_evictions"] > 0
    return result


def test_page_cache_holds_at_most_budget_plus_non_expert_bytes_after_load(residency_engine) -> None:
    _, path, layout, budget = residency_engine
    resident = pagecache.resident_bytes(path)
    assert resident <= budget + layout.non_expert_bytes, (
        f"{resident} bytes of the model in the page cache; budget {budget} + non-expert {layout.non_expert_bytes}")


def test_page_cache_holds_at_most_budget_plus_non_expert_bytes_after_generate(residency_engine) -> None:
    engine, path, layout, budget = residency_engine
    _decode_a_while(engine, path)
    resident = pagecache.resident_bytes(path)
    assert engine.cache_stats()["resident_bytes"] <= budget
    assert resident <= budget + layout.non_expert_bytes, (
        f"{resident} of {layout.file_size} bytes of the model in the page cache after generate; "
        f"budget {budget} + non-expert {layout.non_expert_bytes} = {budget + layout.non_expert_bytes}")


def test_measured_resident_bytes_stay_within_budget_after_load(residency_engine) -> None:
    engine, path, layout, budget = residency_engine
    measured = engine.measured_resident_bytes()
    distinct = _distinct_expert_pages_resident(path, layout)
    assert measured <= budget, (
        f"measured_resident_bytes()={measured} > budget {budget}; distinct resident pages holding expert "
        f"bytes (independent mincore): {distinct}")


def test_measured_resident_bytes_stay_within_budget_after_generate(residency_engine) -> None:
    engine, path, layout, budget = residency_engine
    _decode_a_while(engine, path)
    measured = engine.measured_resident_bytes()
    distinct = _distinct_expert_pages_resident(path, layout)
    assert measured <= budget, (
        f"measured_resident_bytes()={measured} > budget {budget}; distinct resident pages holding expert "
        f"bytes (independent mincore): {distinct}")


# -- (d) bad input: the specific error, and nothing broken ---------------------------------


@pytest.mark.parametrize(("kind", "needle"), [
    ("missing", "not found"),
    ("truncated", "truncated"),
    ("header_only", "not a valid GGUF"),
    ("random", "not a valid GGUF"),
    ("bad_magic", "not a valid GGUF"),
    ("empty", "not a valid GGUF"),
    ("dense", "dense model"),
    ("nan_epsilon", "layer_norm_rms_epsilon=nan, expected a finite number > 0"),
    ("huge_block_count", "block_count=2139062143, outside"),
    ("huge_expert_count", "expert_count=2139062143, outside"),
])
@pytest.mark.parametrize("with_cache", [True, False])
def test_unusable_model_file_raises_model_file_error_naming_the_problem(
        kind: str, needle: str, with_cache: bool, bad_model_files: dict[str, Path], dense_model: Path,
        tmp_path: Path, tiny_model: Path, tiny_layout, tiny_topics: list[list[str]],
        capfd: pytest.CaptureFixture[str]) -> None:
    path = {"missing": tmp_path / "no-such-model.gguf", "dense": dense_model}.get(kind) or bad_model_files[kind]
    with pytest.raises(ModelFileError, match=needle) as info:
        open_engine(path, budget_fraction(tiny_layout, 0.4) if with_cache else None)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert capfd.readouterr().err == ""  # ggml's GGUF reader logged nothing of its own
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize("command", [["run", "--prompt", "x"], ["serve", "--local-nodes", "1"], ["bench", "engine"],
                                     ["bench", "batch"], ["demo"]])
def test_every_command_taking_a_model_refuses_a_bad_file_in_one_line_before_llama_cpp_logs(
        command: list[str], bad_model_files: dict[str, Path], tmp_path: Path) -> None:
    unreadable = tmp_path / "unreadable.gguf"
    unreadable.mkdir()
    for path, needle in (("/etc/passwd", "it starts with b'root', expected b'GGUF'"),
                         (bad_model_files["empty"], "0 bytes; a GGUF model starts with a 24-byte header"),
                         (bad_model_files["header_only"], "ggml: failed to read key-value pairs"),
                         (unreadable, "not a regular file")):
        done = subprocess.run([sys.executable, "-m", "cluster", command[0], "--model", str(path), *command[1:]],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (command, path, done.stderr)
        assert done.stderr.startswith("error: ") and needle in done.stderr and str(path) in done.stderr, done.stderr


def test_budget_below_one_layers_top_k_raises_cache_budget_error(tiny_model: Path, tiny_layout,
                                                                tiny_topics: list[list[str]]) -> None:
    k = tiny_layout.n_experts_used
    need = int(np.sort(tiny_layout.unit_bytes, axis=1)[:, -k:].sum(axis=1).max())
    with pytest.raises(CacheBudgetError, match="decode step") as info:
        open_engine(tiny_model, need - 1)
    assert str(need - 1) in str(info.value) and str(need) in str(info.value)
    with open_engine(tiny_model, need) as engine:  # exactly one step's experts: accepted and working
        assert engine.generate(synth.topic_prompt(tiny_topics, 0, 4, seed=0), max_tokens=4).n_generated == 4
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize(("cache_bytes", "error"), [
    (0, CacheBudgetError), (-1, CacheBudgetError), ("x", InvalidParameterError),
    (1.5, InvalidParameterError), (True, InvalidParameterError),
])
def test_bad_cache_bytes_raise_a_specific_error_naming_cache_bytes(
        cache_bytes: object, error: type[Exception], tiny_model: Path, tiny_layout,
        tiny_topics: list[list[str]]) -> None:
    with pytest.raises(error, match="cache_bytes"):
        open_engine(tiny_model, cache_bytes)  # type: ignore[arg-type]
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"n_ctx": 0}, "n_ctx"), ({"n_ctx": "256"}, "n_ctx"), ({"n_batch": 0}, "n_batch"),
    ({"n_threads": 0}, "n_threads"), ({"n_io_threads": -1}, "n_io_threads"),
])
def test_bad_engine_settings_raise_invalid_parameter_error_naming_the_setting(
        kwargs: dict[str, object], needle: str, tiny_model: Path, tiny_layout, tiny_topics: list[list[str]]) -> None:
    with pytest.raises(InvalidParameterError, match=needle):
        open_engine(tiny_model, budget_fraction(tiny_layout, 0.4), **kwargs)
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": N_CTX + 1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop"),
])
def test_bad_request_parameters_raise_invalid_parameter_error_before_anything_runs(
        kwargs: dict[str, object], needle: str, cached_engine: MoEEngine, tiny_model: Path, tiny_layout,
        tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 0, 4, seed=0)
    steps_before = cached_engine.cache_stats()["n_steps"]
    with pytest.raises(InvalidParameterError, match=needle):
        cached_engine.generate(prompt, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=needle):
        cached_engine.stream(prompt, **kwargs)  # type: ignore[arg-type]  # raised at the call, not on next()
    assert cached_engine.cache_stats()["n_steps"] == steps_before, "nothing may run for a rejected request"
    assert cached_engine.generate(prompt, max_tokens=3).n_generated == 3
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize("prompt", ["", None, 42])
def test_empty_or_non_string_prompt_raises_invalid_parameter_error(prompt: object, cached_engine: MoEEngine) -> None:
    with pytest.raises(InvalidParameterError, match="prompt"):
        cached_engine.generate(prompt, max_tokens=3)  # type: ignore[arg-type]
    assert cached_engine.generate(" x", max_tokens=2).n_generated == 2


def test_prompt_longer_than_the_context_raises_prompt_too_long_error(
        cached_engine: MoEEngine, tiny_model: Path, tiny_layout, tiny_topics: list[list[str]]) -> None:
    assert cached_engine.n_ctx == N_CTX
    prompt = synth.topic_prompt(tiny_topics, 0, N_CTX + 40, seed=0)
    n_tokens = len(cached_engine.tokenize(prompt))
    with pytest.raises(PromptTooLongError, match=f"{n_tokens} tokens") as info:
        cached_engine.generate(prompt, max_tokens=4)
    assert str(N_CTX) in str(info.value)
    with pytest.raises(PromptTooLongError):
        cached_engine.generate(synth.topic_prompt(tiny_topics, 0, N_CTX - 1, seed=0), max_tokens=4)  # + BOS = n_ctx
    assert cached_engine.generate(synth.topic_prompt(tiny_topics, 1, 5, seed=0), max_tokens=3).n_generated == 3
    assert_fresh_engine_works(tiny_model, tiny_layout, tiny_topics)


@pytest.mark.parametrize(("n_ctx", "n_words"), [(64, 90), (300, 400)])
def test_prompt_longer_than_the_requested_context_does_not_abort_the_process(
        n_ctx: int, n_words: int, tiny_model: Path, tiny_layout, tiny_topics: list[list[str]]) -> None:
    """llama.cpp pads n_ctx up (64 -> 256, 300 -> 512) but caps n_batch at the n_ctx asked for.

    A prompt between the two must be refused or generated, never abort the process. It runs in
    a child process so that an abort does not take the test session down.
    """
    prompt = synth.topic_prompt(tiny_topics, 0, n_words, seed=0)
    code = "\n".join([
        "from cluster.engine.moe_engine import MoEEngine",
        "from cluster.errors import PromptTooLongError",
        f"engine = MoEEngine({str(tiny_model)!r}, {budget_fraction(tiny_layout, 0.4)}, n_ctx={n_ctx}, n_threads=2)",
        f"prompt = {prompt!r}",
        f"assert len(engine.tokenize(prompt)) > {n_ctx}",
        "try:",
        "    print('generated', engine.generate(prompt, max_tokens=2).n_generated)",
        "except PromptTooLongError as exc:",
        "    print('refused', exc)",
    ])
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert child.returncode == 0, (
        f"the process died (exit {child.returncode}) on a {n_words + 1}-token prompt with n_ctx={n_ctx}: "
        + "\n".join(line for line in child.stderr.splitlines() if "GGML_ASSERT" in line or "Error" in line)[-1500:])
    assert child.stdout.startswith(("generated 2", "refused"))


# -- (e) streaming, stop strings, length, close --------------------------------------------


def test_stream_pieces_concatenate_to_the_generated_text(cached_engine: MoEEngine,
                                                         tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 3, 5, seed=8)
    pieces, streamed = run_stream(cached_engine.stream(prompt, max_tokens=20))
    generated = cached_engine.generate(prompt, max_tokens=20)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == streamed.text == generated.text
    assert streamed.tokens == generated.tokens
    assert generated.n_reused_tokens > 0  # the second run reused the first one's KV prefix: same text


def test_stop_string_cuts_the_text_and_finishes_with_stop(cached_engine: MoEEngine,
                                                          tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 1, 5, seed=9)
    full = cached_engine.generate(prompt, max_tokens=20)
    words = full.text.split(" ")[1:]
    assert len(words) >= 8
    stop = " " + words[4]
    expected = full.text[:full.text.find(stop)]
    result = cached_engine.generate(prompt, max_tokens=20, stop=[stop])
    assert result.text == expected
    assert result.finish_reason == "stop"
    assert result.n_generated < 20
    pieces, streamed = run_stream(cached_engine.stream(prompt, max_tokens=20, stop=(stop,)))
    assert "".join(pieces) == streamed.text == expected and streamed.finish_reason == "stop"
    # several stop strings: the earliest in the text wins
    early = " " + words[2]
    assert cached_engine.generate(prompt, max_tokens=20, stop=[stop, early]).text == full.text[:full.text.find(early)]
    # a bare string is one stop string, not a set of characters
    assert cached_engine.generate(prompt, max_tokens=20, stop=stop).text == expected


def test_max_tokens_finishes_with_length_after_exactly_max_tokens(cached_engine: MoEEngine,
                                                                  tiny_topics: list[list[str]]) -> None:
    for max_tokens in (1, 7):
        result = cached_engine.generate(synth.topic_prompt(tiny_topics, 0, 3, seed=2), max_tokens=max_tokens)
        assert result.finish_reason == "length"
        assert result.n_generated == max_tokens


def test_close_is_idempotent_and_a_closed_engine_raises_engine_closed_error(tiny_model: Path, tiny_layout) -> None:
    engine = open_engine(tiny_model, budget_fraction(tiny_layout, 0.4))
    assert engine.generate(" x", max_tokens=2).n_generated == 2
    engine.close()
    engine.close()
    for call in (lambda: engine.generate(" x", max_tokens=2), lambda: engine.stream(" x", max_tokens=2),
                 engine.cache_stats, engine.warmth, engine.measured_resident_bytes):
        with pytest.raises(EngineClosedError):
            call()
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4)) as scoped:
        scoped.generate(" x", max_tokens=1)
    with pytest.raises(EngineClosedError):
        scoped.generate(" x", max_tokens=1)


# -- (f) telemetry and warmth --------------------------------------------------------------


def test_prefetch_scores_are_fractions_and_warmth_matches_cache_stats(tiny_model: Path, tiny_layout,
                                                                      tiny_topics: list[list[str]]) -> None:
    layout = tiny_layout
    budget = budget_fraction(layout, 0.4)
    with open_engine(tiny_model, budget) as engine:
        result = engine.generate(synth.mixed_prompt(tiny_topics, [0, 2], 4, seed=6), max_tokens=16)
        stats = engine.cache_stats()
        report = warmth.decode(engine.warmth(heat=True))
    for source in (result.cache, stats):
        assert source["n_predicted"] > 0
        assert 0.0 <= source["prefetch_precision"] <= 1.0
        assert 0.0 <= source["prefetch_recall"] <= 1.0
        assert 0.0 <= source["hit_rate"] <= 1.0
    assert report.resident.shape == report.heat.shape == (layout.n_layers, layout.n_experts)
    assert stats["resident_bytes"] > 0
    assert report.resident_bytes == stats["resident_bytes"] <= budget
    assert int(layout.unit_bytes[report.resident].sum()) == stats["resident_bytes"]
    assert report.budget_bytes == budget == stats["budget_bytes"]
    assert report.counters == {name: stats[name] for name in report.counters} and report.counters
    # heat is recency-weighted selections: warm exactly where this (only) request selected
    np.testing.assert_array_equal(report.heat > 0, result.expert_counts > 0)


# -- (g) sampling options and log-probabilities, through llama.cpp's sampler chain ----------


def _engine_pieces(engine: MoEEngine, prompt: str, params: SamplingParams) -> tuple[list[Piece], Generation]:
    gen = engine.pieces(prompt, params)
    pieces: list[Piece] = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return pieces, done.value


def test_the_same_seed_gives_the_same_text_and_other_seeds_other_texts(cached_engine: MoEEngine,
                                                                        tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 2, 4, seed=3)
    texts = [cached_engine.generate(prompt, max_tokens=16, temperature=1.5, seed=seed).text for seed in range(4)]
    again = [cached_engine.generate(prompt, max_tokens=16, temperature=1.5, seed=seed).text for seed in range(4)]
    assert texts == again
    assert len(set(texts)) >= 3


def test_top_k_1_and_min_p_1_keep_only_the_likeliest_token(cached_engine: MoEEngine, tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 0, 4, seed=4)
    greedy = cached_engine.generate(prompt, max_tokens=16)
    hot = [cached_engine.generate(prompt, max_tokens=16, temperature=2.0, seed=seed) for seed in range(3)]
    assert any(g.tokens != greedy.tokens for g in hot)  # sampling this hot does leave the greedy path
    for narrowed in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in range(3):
            assert cached_engine.generate(prompt, max_tokens=16, temperature=2.0, seed=seed, **narrowed).tokens == greedy.tokens


def test_a_logit_bias_of_minus_100_removes_a_token_the_greedy_answer_uses(cached_engine: MoEEngine,
                                                                          tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 1, 4, seed=5)
    greedy = cached_engine.generate(prompt, max_tokens=12)
    banned = greedy.tokens[3]
    without = cached_engine.generate(prompt, max_tokens=12, logit_bias={banned: -100})
    assert banned not in without.tokens and without.tokens[:3] == greedy.tokens[:3]
    favoured = greedy.tokens[-1]
    assert cached_engine.generate(prompt, max_tokens=3, logit_bias={favoured: 100}).tokens == (favoured,) * 3
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        cached_engine.generate(prompt, max_tokens=3, logit_bias={cached_engine.tokenizer.n_vocab: 1.0})


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 3.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}])
def test_penalties_stop_a_favoured_token_from_repeating(cached_engine: MoEEngine, tiny_topics: list[list[str]],
                                                        penalty: dict[str, float]) -> None:
    word = tiny_topics[0][0]
    prompt = synth.topic_prompt(tiny_topics, 3, 4, seed=6) + " " + word  # the model would go on to the next word
    favoured = cached_engine.tokenizer.tokenize(" " + word, add_special=False)[0]
    bias = {favoured: 6.5}  # enough to repeat the prompt's last word every step, by less than a penalty takes away
    assert cached_engine.generate(prompt, max_tokens=20, logit_bias=bias).tokens == (favoured,) * 20
    penalised = cached_engine.generate(prompt, max_tokens=20, logit_bias=bias, **penalty)
    assert 1 <= penalised.tokens.count(favoured) <= 10
    assert penalised.tokens[0] == favoured  # generated tokens are penalised, the prompt's are not
    forgetful = cached_engine.generate(prompt, max_tokens=20, logit_bias=bias, penalty_last_n=1, **penalty)
    assert forgetful.tokens.count(favoured) > penalised.tokens.count(favoured)  # a 1-token window forgets sooner


def test_logprobs_are_the_log_softmax_of_the_position_and_line_up_with_the_text(
        cached_engine: MoEEngine, tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 0, 5, seed=7)
    pieces, gen = _engine_pieces(cached_engine, prompt, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=3))
    entries = gen.logprobs
    assert entries is not None and len(entries) == gen.n_generated == 12
    assert [e for p in pieces for e in p.logprobs] == list(entries)  # streamed with the pieces they start in
    for entry in entries:
        assert entry.top[0].token == entry.token and entry.top[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top) <= 1 + 1e-9
        piece = entry.piece.decode("utf-8")
        assert gen.text[entry.offset:entry.offset + len(piece)] == piece
    sampled = cached_engine.generate(prompt, max_tokens=12, temperature=1.5, seed=1, logprobs=True)
    assert all(not e.top for e in sampled.logprobs) and any(e.logprob < entries[0].logprob for e in sampled.logprobs)
    assert cached_engine.generate(prompt, max_tokens=3).logprobs is None


def test_logprobs_stop_where_a_stop_string_cuts_the_text(cached_engine: MoEEngine, tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 1, 5, seed=9)
    full = cached_engine.generate(prompt, max_tokens=20)
    stop = " " + full.text.split(" ")[5]
    cut = cached_engine.generate(prompt, max_tokens=20, stop=stop, logprobs=True)
    assert cut.finish_reason == "stop" and len(cut.logprobs) == 4 < cut.n_generated
    assert b"".join(e.piece for e in cut.logprobs).decode() == cut.text


def test_each_choice_has_its_own_seed_and_the_engine_makes_one_per_call(cached_engine: MoEEngine,
                                                                       tiny_topics: list[list[str]]) -> None:
    prompt = synth.topic_prompt(tiny_topics, 2, 4, seed=8)
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=42, n=3)
    texts = [cached_engine.generate(prompt, choice).text for choice in params.choices()]
    assert len(set(texts)) == 3
    assert texts[0] == cached_engine.generate(prompt, params.updated(n=1)).text  # choice 0 keeps the request's seed
    with pytest.raises(InvalidParameterError, match="n must be 1 here"):
        cached_engine.generate(prompt, params)
