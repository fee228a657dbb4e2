"""Type stubs of the native module ``cluster._routing`` (csrc/routing-bindings.cpp): the router's
maths, with no llama.cpp inside. The typed surface is ``cluster.routing.warmth``;
tests/test_layout.py checks that every public name of the module is declared here."""

import numpy as np
import numpy.typing as npt

AFFINITY_CODE_MAX: int
AFFINITY_LOG_MISS_RANGE: float
AFFINITY_MAX_PROB: float

def affinity_encode(prob: npt.ArrayLike) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]: ...
def request_demand(log_miss: npt.ArrayLike, prob: npt.ArrayLike, token_rows: npt.ArrayLike, starts: npt.ArrayLike,
                   max_sampled: int, decode_context: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64],
                                                                   npt.NDArray[np.float32], int]: ...
def expected_loads(residency: npt.ArrayLike, node_rows: npt.ArrayLike, node_groups: npt.ArrayLike,
                   prefill: npt.ArrayLike, decode: npt.ArrayLike,
                   decode_steps: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def prefix_hashes(tokens: npt.ArrayLike, block: int, max_blocks: int) -> npt.NDArray[np.uint64]: ...
