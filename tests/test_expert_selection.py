"""Cache-aware expert selection (csrc/expert-selection.h, cluster.engine.expert_selection): the rule on its own
(bounds, order, stand-ins, skips, rows of one access), and in llama.cpp: exact is untouched, cache-aware reads fewer
expert bytes under a budget and says per request how many selections it changed, changes nothing when every
expert is resident, runs on every family whose top-k is taken on the scores its weights come from and refuses
the others with the reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cluster import _native
from cluster.engine.cache import discover_layout
from cluster.engine.expert_selection import ExpertSelection
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.sampling import SamplingParams
from cluster.errors import InvalidParameterError
from cluster.models import synth
from cluster.models.synth_families import FAMILIES

TRAINED = Path(__file__).resolve().parent.parent / "trained" / "moe-5domains.gguf"
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)


def _config(max_changed_weight: float, min_score_ratio: float) -> _native.SelectionConfig:
    c = _native.SelectionConfig()
    c.mode = "cache-aware"
    c.max_changed_weight = max_changed_weight
    c.min_score_ratio = min_score_ratio
    return c


def _select(config: _native.SelectionConfig, gate: list[list[float]], ids: list[list[int]], available: list[int]):
    return _native.cache_aware_select(config, np.array(gate, np.float32), np.array(ids, np.int32),
                                      np.array(available, np.uint8))


GATE = [[0.40, 0.30, 0.15, 0.10, 0.05]]  # expert e's score; the top-3 is 0, 1, 2


def test_a_missing_expert_is_replaced_by_the_best_resident_one_outside_the_selection() -> None:
    ids, skipped, replaced, n_skipped = _select(_config(0.3, 0.5), GATE, [[0, 1, 2]], [1, 1, 0, 1, 1])
    assert ids.tolist() == [[0, 1, 3]] and skipped.tolist() == [[0, 0, 0]] and (replaced, n_skipped) == (1, 0)


def test_a_stand_in_scoring_below_the_ratio_skips_the_expert() -> None:
    ids, skipped, replaced, n_skipped = _select(_config(0.3, 0.7), GATE, [[0, 1, 2]], [1, 1, 0, 1, 1])
    # 0.10 < 0.7 * 0.15: the slot keeps a resident id (nothing to read) and is marked for a zero weight
    assert ids.tolist() == [[0, 1, 3]] and skipped.tolist() == [[0, 0, 1]] and (replaced, n_skipped) == (0, 1)


def test_the_changed_share_is_bounded_and_the_smallest_shares_go_first() -> None:
    # shares of the top-3: 0.40/0.85, 0.30/0.85, 0.15/0.85 = 0.47, 0.35, 0.18; experts 1 and 2 missing
    available = [1, 0, 0, 1, 1]
    assert _select(_config(0.0, 0.0), GATE, [[0, 1, 2]], available)[0].tolist() == [[0, 1, 2]]  # nothing may change
    assert _select(_config(0.17, 0.0), GATE, [[0, 1, 2]], available)[0].tolist() == [[0, 1, 2]]  # 0.18 > 0.17
    assert _select(_config(0.2, 0.0), GATE, [[0, 1, 2]], available)[0].tolist() == [[0, 1, 3]]  # expert 2 only
    assert _select(_config(0.6, 0.0), GATE, [[0, 1, 2]], available)[0].tolist() == [[0, 4, 3]]  # both
    with pytest.raises(ValueError, match="max_changed_weight"):
        _config(1.5, 0.0).validate()


def test_an_expert_one_row_keeps_is_there_for_the_rows_after_it() -> None:
    # row 0 keeps missing expert 2 (its share is over the bound): it will be read, so row 1 keeps it too
    gate = [[0.10, 0.10, 0.80, 0.0, 0.0], [0.5, 0.05, 0.45, 0.0, 0.0]]
    ids, _, replaced, _ = _select(_config(0.3, 0.0), gate, [[2, 0, 1], [0, 2, 1]], [1, 1, 0, 1, 1])
    assert ids.tolist() == [[2, 0, 1], [0, 2, 1]] and replaced == 0
    ids, _, replaced, _ = _select(_config(0.3, 0.0), gate[1:], [[0, 2, 1]], [1, 1, 0, 1, 1])
    assert replaced == 0 and ids.tolist() == [[0, 2, 1]]  # 0.45 / 1.0 > 0.3 on its own as well


def test_bounds_are_checked_on_every_surface() -> None:
    for bad in (ExpertSelection("sometimes"), ExpertSelection("cache-aware", 1.5), ExpertSelection("cache-aware", 0.2, -1)):
        with pytest.raises(InvalidParameterError):
            bad.validate()
    with pytest.raises(InvalidParameterError, match="needs the expert cache"):
        MoEEngine(TRAINED, None, expert_selection=ExpertSelection("cache-aware"))


def _run(selection: ExpertSelection, budget: int | None) -> tuple[object, dict[str, float]]:
    with MoEEngine(TRAINED, budget, n_ctx=512, n_threads=2, expert_selection=selection) as engine:
        gen = engine.generate(PROMPT, GREEDY)
        return gen, engine.cache_stats()


def test_cache_aware_reads_fewer_bytes_and_counts_its_changes_per_request() -> None:
    layout = discover_layout(str(TRAINED))
    third = int(layout.unit_bytes.sum() / 3)
    plain, _ = _run(ExpertSelection(), None)
    exact, _ = _run(ExpertSelection(), third)
    assert exact.tokens == plain.tokens  # exact under a budget: llama.cpp's own text
    assert exact.cache["n_selections_replaced"] == exact.cache["n_selections_skipped"] == 0
    aware, totals = _run(ExpertSelection("cache-aware", 0.3, 0.5), third)
    changed = aware.cache["n_selections_replaced"] + aware.cache["n_selections_skipped"]
    assert changed > 0
    assert aware.cache["n_selections_replaced"] == totals["n_selections_replaced"]  # one request: all of them
    assert aware.cache["n_selections_skipped"] == totals["n_selections_skipped"]
    assert aware.cache["n_misses_decode"] < exact.cache["n_misses_decode"]
    assert aware.cache["bytes_read_decode"] < exact.cache["bytes_read_decode"]
    # every expert resident: nothing to change, the text is exact's
    full, _ = _run(ExpertSelection("cache-aware", 1.0, 0.0), int(layout.unit_bytes.sum() * 1.05))
    assert full.tokens == plain.tokens and full.cache["n_selections_replaced"] == 0


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_runs_cache_aware_or_says_why_not(arch: str, tmp_path: Path) -> None:
    config = dataclasses.replace(synth.PRESETS["tiny"], arch=arch)
    path = synth.synthesize(tmp_path / f"{arch}.gguf", config, progress=False).path
    layout = discover_layout(str(path))
    budget = int(layout.unit_bytes.sum()) // 3
    selection = ExpertSelection("cache-aware", 0.5, 0.5)
    prompt = synth.topic_prompt(synth.read_topics(path), 1, 12, seed=0)
    if layout.selection_off:
        assert arch in ("llama4", "grovemoe"), layout.selection_off
        with pytest.raises(InvalidParameterError, match="cache-aware expert selection cannot run"):
            MoEEngine(path, budget, n_ctx=256, n_threads=2, expert_selection=selection)
        return
    with MoEEngine(path, budget, n_ctx=256, n_threads=2, n_batch=16, expert_selection=selection) as engine:
        gen = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0))
    assert len(gen.tokens) == 24
    assert gen.cache["n_selections_replaced"] + gen.cache["n_selections_skipped"] > 0, arch


def _forced_logits(model, tokens: list[int], forced: list[dict[int, np.ndarray]]):
    """The PyTorch twin of the trained model on ``tokens`` with layer l's experts at position p taken from
    ``forced[l][p]`` where given (its own top-k elsewhere), each weighed as qwen3moe weighs its selection: its
    softmax probability, renormalised over the k selected."""
    import torch

    with torch.no_grad():
        x = model.embed(torch.tensor([tokens]))
        for il, block in enumerate(model.blocks):
            x = x + block.attn(block.attn_norm(x), model.rope_cos, model.rope_sin)
            h = block.ffn_norm(x)[0]
            moe = block.moe
            probs = torch.softmax(moe.router(h), dim=-1)
            top_i = torch.topk(probs, moe.cfg.n_expert_used, dim=-1).indices
            for position, ids in forced[il].items():
                top_i[position] = torch.from_numpy(ids.astype(np.int64))
            weights = probs.gather(1, top_i)
            weights = weights / weights.sum(-1, keepdim=True)
            gate, up = moe.gate_up_views()
            out = torch.zeros_like(h)
            for j in range(top_i.shape[1]):
                e = top_i[:, j]
                a = torch.einsum("td,tfd->tf", h, gate[e])
                b = torch.einsum("td,tfd->tf", h, up[e])
                y = torch.einsum("tf,tdf->td", torch.nn.functional.silu(a) * b, moe.w_down[e])
                out += weights[:, j:j + 1] * y
            x = x + out[None]
        return (model.norm(x) @ model.embed.weight.T)[0].numpy()


def test_a_changed_selection_is_weighed_as_the_family_weighs_a_selection() -> None:
    """llama.cpp with cache-aware selection (replacing only) generates what the PyTorch twin of the trained model
    predicts when each position's experts are forced to the ones the cache's trace says were used, weighed by the
    qwen3moe rule (softmax probability renormalised over the selection) — and not what the twin predicts with its
    own selection: the graph computes the changed selection as the model would weigh it."""
    pytest.importorskip("torch")
    from cluster.train.verify import torch_model_from_gguf

    layout = discover_layout(str(TRAINED))
    with MoEEngine(TRAINED, int(layout.unit_bytes.sum() / 4), n_ctx=512, n_threads=2,
                   expert_selection=ExpertSelection("cache-aware", 0.6, 0.0)) as engine:
        prompt = engine.tokenize(PROMPT)
        gen = engine.generate(prompt, GREEDY)
    assert gen.cache["n_selections_replaced"] > 20 and gen.cache["n_selections_skipped"] == 0
    prompt = list(prompt)
    if prompt[0] != 0:
        prompt = [0] + prompt  # the BOS the engine adds
    assert gen.n_prompt_tokens == len(prompt)
    forced: list[dict[int, np.ndarray]] = [{} for _ in range(layout.n_layers)]
    for step, ubatch in enumerate(gen.trace.ubatches()):
        for layer, ids in ubatch:
            if step == 0:  # the prompt: every row (the last layer: the row with logits, the last)
                first = len(prompt) - ids.shape[0]
                for row in range(ids.shape[0]):
                    forced[layer][first + row] = ids[row]
            else:  # generated token step-1 fed back at its position
                forced[layer][len(prompt) + step - 1] = ids[0]
    tokens = prompt + list(gen.tokens[:-1])
    model = torch_model_from_gguf(TRAINED)
    start = len(prompt) - 1
    generated = np.array(gen.tokens)
    twin = _forced_logits(model, tokens, forced)[start:].argmax(-1)
    own = _forced_logits(model, tokens, [{} for _ in range(layout.n_layers)])[start:].argmax(-1)
    agree_forced = float((twin == generated).mean())
    agree_own = float((own == generated).mean())
    assert agree_forced >= 0.95, (agree_forced, agree_own)
    assert agree_forced > agree_own, (agree_forced, agree_own)
