"""How a node's engine picks each token's experts: ``ExpertSelection`` (exact, or cache-aware within bounds).

``exact`` (the default) leaves llama.cpp's choice alone: the output is bit-identical to llama.cpp's.
``cache-aware`` lets the expert cache change a token's selection where an expert it picked is not in
memory (``csrc/expert-selection.h``): the missing expert is replaced by the resident expert with the
highest router score outside the selection when that score is at least ``min_score_ratio`` of the
missing one's, and skipped (its weight set to zero) otherwise; the experts changed for one token
may hold at most ``max_changed_weight`` of its top-k router weight (the selected experts' weights
normalised to sum to 1), smallest first. The model's own graph then turns the scores into weights
by its family's rule (renormalised for softmax top-k families, a softmax over the selected logits
for gpt-oss), so the changed selection is weighted as the model would weigh it. Without a cache
(everything in memory) nothing is ever changed. It changes the model's output: measure what it
costs with ``python -m cluster bench quality`` (``docs/quality.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import InvalidParameterError

EXACT = "exact"
CACHE_AWARE = "cache-aware"
SELECTION_MODES = (EXACT, CACHE_AWARE)


@dataclass(frozen=True)
class ExpertSelection:
    """Exact or cache-aware expert selection, and the bounds of the latter.

    Attributes:
        mode: ``"exact"`` or ``"cache-aware"``.
        max_changed_weight: in [0, 1], the share of a token's top-k router weight whose experts
            may be replaced or skipped (0: nothing changes). The default, 0.3, cost 0.5 % and 1.7 %
            more bits per token on the two trained models' held-out text for a third and a sixth of
            exact's expert bytes at a third of the experts (docs/quality.md, docs/quality-8domains).
        min_score_ratio: in [0, 1], a resident stand-in replaces a missing expert only if its router
            score is at least this fraction of the missing one's; below, the expert is skipped
            (0: always replace, never skip; 1: only an equal score replaces).
    """

    mode: str = EXACT
    max_changed_weight: float = 0.3
    min_score_ratio: float = 0.5

    @property
    def cache_aware(self) -> bool:
        return self.mode == CACHE_AWARE

    def validate(self) -> None:
        if self.mode not in SELECTION_MODES:
            raise InvalidParameterError(f"expert selection must be one of {', '.join(SELECTION_MODES)}, "
                                        f"got {self.mode!r}", param="expert_selection")
        for name in ("max_changed_weight", "min_score_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidParameterError(f"{name} must be a number in [0, 1], got {value!r}", param=name)

    def describe(self) -> str:
        """``exact``, or ``cache-aware (max weight 0.3, min ratio 0.5)``."""
        if not self.cache_aware:
            return EXACT
        return f"{CACHE_AWARE} (max weight {self.max_changed_weight:g}, min ratio {self.min_score_ratio:g})"


EXACT_SELECTION = ExpertSelection()
"""llama.cpp's own selection, the default everywhere (frozen: one instance serves as every default argument)."""
