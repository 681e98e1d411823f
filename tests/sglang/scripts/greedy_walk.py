"""SGLang's greedy tree walk on given verify inputs: its Triton kernel ``verify_tree_greedy_triton`` (the same
walk as its CUDA and CPU ops), run by Triton's interpreter on CPU. Prints, per input, the accepted nodes and
how many drafts each request accepted.

    python tests/sglang/scripts/greedy_walk.py '[{"candidates": [[...]], "retrieve_index": ..., ...}, ...]'

TRITON_INTERPRET is read when triton is imported, hence a process of its own.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton  # noqa: E402

from afterburner.plugins.devtools.worker import print_result  # noqa: E402


def walk(given: dict) -> dict:
    """``eagle_sample``'s greedy branch: candidates, retrieve_* and target_predict [B, N]."""
    t = {name: torch.tensor(value, dtype=torch.long) for name, value in given.items()}
    bs, n = t["candidates"].shape
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, n), -1, dtype=torch.int32)
    accepted = torch.zeros(bs, dtype=torch.int32)
    verify_tree_greedy_triton(predicts, accept_index, accepted, t["candidates"], t["retrieve_index"],
                              t["retrieve_next_token"], t["retrieve_next_sibling"], t["target_predict"])
    return {"accept_index": accept_index.tolist(), "accepted": accepted.tolist()}


if __name__ == "__main__":
    print_result([walk(given) for given in json.loads(sys.argv[1])])
