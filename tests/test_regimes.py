"""bench regimes: its statistics on hand-made routing traces, where the right answer is counted by hand, and its report's rows."""

import json
from pathlib import Path

import numpy as np

from cluster.bench.regimes import experts_covering, median_reuse_distance, write_report
from cluster.engine.cache import TRACE_ACCESS, RoutingTrace


def _decode_trace(tokens: list[list[list[int]]]) -> RoutingTrace:
    """One decoded token per entry, each the experts every layer (in order) selected for it."""
    kind, layer, n_tokens, n_ids, ids = [], [], [], [], []
    for per_layer in tokens:
        for il, selected in enumerate(per_layer):
            kind.append(TRACE_ACCESS), layer.append(il), n_tokens.append(1), n_ids.append(len(selected))
            ids.extend(selected)
    return RoutingTrace(kind=np.array(kind, np.uint8), layer=np.array(layer, np.int32),
                        n_tokens=np.array(n_tokens, np.int32), n_ids=np.array(n_ids, np.int32),
                        ids=np.array(ids, np.int32))


def test_experts_covering_counts_the_fewest_experts_that_reach_the_share_per_layer():
    # layer 0: expert 0 selected 9 times, expert 1 once -> one expert of 4 covers 90 % (0.25);
    # layer 1: four experts selected equally -> four of 4 needed for 90 % (1.0)
    tokens = [[[0], [t % 4]] for t in range(9)] + [[[1], [0]]]
    tokens[-1][1] = [1]  # layer 1 counts: 0:3, 1:3, 2:2, 3:2 -> 90 % of 10 = 9 needs all four
    trace = _decode_trace(tokens)
    assert experts_covering(trace, n_layers=2, n_experts=4) == (0.25 + 1.0) / 2
    assert experts_covering(trace, n_layers=2, n_experts=4, share=0.5) == (0.25 + 0.5) / 2


def test_median_reuse_distance_counts_decoded_tokens_since_the_layers_last_selection_within_a_request():
    # one layer: expert 0 at tokens 0, 1, 4 (distances 1, 3); expert 1 at tokens 0, 2 (distance 2)
    first = _decode_trace([[[0, 1]], [[0, 2]], [[1, 3]], [[2, 3]], [[0, 5]]])
    # distances within the first request: 0: 1, 3; 1: 2; 2: 2; 3: 1 -> sorted 1, 1, 2, 2, 3
    assert median_reuse_distance([first]) == 2
    # a second request starts afresh: its first selection of expert 0 is not a reuse of the first request's
    # (were it counted from the first request's token 4, expert 0 would add a distance of -4 and 5 of -4)
    second = _decode_trace([[[0, 5]], [[0, 7]], [[7, 9]], [[9, 8]], [[8, 4]]])
    # adds 0: 1; 7: 1; 9: 1; 8: 1 -> 1, 1, 1, 1, 1, 1, 2, 2, 3
    assert median_reuse_distance([first, second]) == 1
    assert np.isnan(median_reuse_distance([_decode_trace([[[0, 1]]])]))


def _row(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "prompts": "synthetic topic prompts", "n_layers": 4, "n_experts": 128, "k": 8,
            "n_requests": 8, "max_tokens": 64, "next_token_reuse": 0.3, "chance_reuse": 0.0625,
            "top_third_mass": 0.7, "chance_top_third": 0.336, "prefill_share": 0.7, "n_decode_tokens": 504,
            "decode_hit_rate_at_third": {"lru": 0.8, "ours": 0.8, "min": 0.9}, "lru_at_40": 0.93,
            "experts_covering_90": 0.49, "median_reuse_distance": 2.0, **extra}


def test_a_layer_truncated_preset_row_says_which_layers_and_how_the_file_was_written(tmp_path: Path) -> None:
    write_report(_row("/m/other.gguf"), tmp_path, "python -m cluster bench regimes --model /m/other.gguf")
    report = write_report(_row("/m/q-4L.gguf", preset="qwen3-30b-a3b", preset_layers=48), tmp_path,
                          "python -m cluster bench regimes --model /m/q-4L.gguf").read_text()
    rows = {line.split(" | ")[0]: line for line in report.splitlines() if line.startswith("| `")}
    assert rows["| `q-4L.gguf` (preset `qwen3-30b-a3b` cut to its first 4 of 48 layers)"].endswith("| 0.930 | 0.49 | 2 |")
    assert "| `other.gguf`" in rows
    assert ("- `python -m cluster synth /m/q-4L.gguf --preset qwen3-30b-a3b --layers 4 --no-report`, then "
            "`python -m cluster bench regimes --model /m/q-4L.gguf`") in report
    assert "- `python -m cluster bench regimes --model /m/other.gguf`" in report
    assert json.loads((tmp_path / "regimes" / "q-4L.json").read_text())["preset_layers"] == 48
