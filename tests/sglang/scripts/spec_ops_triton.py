"""SGLang's own Triton kernels of the speculative path, run by Triton's interpreter on CPU: the greedy tree
walk (``verify_tree_greedy_triton``, the same walk as its CUDA and CPU ops) and the index kernels whose CPU
counterparts the sgl_kernel test shim writes in torch. Prints, per call, what each kernel wrote.

    python tests/sglang/scripts/spec_ops_triton.py '[{"op": "greedy_walk", "candidates": [[...]], ...}, ...]'

TRITON_INTERPRET is read when triton is imported, hence a process of its own.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs  # noqa: E402
from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc  # noqa: E402
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton  # noqa: E402
from sglang.srt.mem_cache.allocation import assign_req_to_token_pool  # noqa: E402

from afterburner.plugins.devtools.worker import print_result  # noqa: E402


def greedy_walk(t: dict) -> dict:
    """``eagle_sample``'s greedy branch: candidates, retrieve_* and target_predict [B, N]."""
    bs, n = t["candidates"].shape
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, n), -1, dtype=torch.int32)
    accepted = torch.zeros(bs, dtype=torch.int32)
    verify_tree_greedy_triton(predicts, accept_index, accepted, t["candidates"], t["retrieve_index"],
                              t["retrieve_next_token"], t["retrieve_next_sibling"], t["target_predict"])
    return {"predicts": predicts.tolist(), "accept_index": accept_index.tolist(), "accepted": accepted.tolist()}


def cache_locs(t: dict, kernel) -> dict:
    """``assign_extend_cache_locs`` (req_to_token -> out_cache_loc) or ``assign_req_to_token_pool`` (back)."""
    bs = t["req_pool_indices"].numel()
    req_to_token, out = t["req_to_token"].clone(), t["out_cache_loc"].clone()
    kernel[(bs,)](t["req_pool_indices"], req_to_token, t["start_offset"], t["end_offset"], out,
                  req_to_token.shape[1], 1 << max(bs - 1, 0).bit_length())
    return {"req_to_token": req_to_token.tolist(), "out_cache_loc": out.tolist()}


def accept_out_cache_loc(t: dict) -> dict:
    out = torch.zeros(t["accept_index"].numel(), dtype=torch.long)
    size = t["accept_index"].numel()
    fill_accept_out_cache_loc[(size,)](t["accept_index"], t["out_cache_loc"], out, 1 << max(size - 1, 0).bit_length())
    return {"accept_out_cache_loc": out.tolist()}


OPS = {"greedy_walk": greedy_walk, "assign_extend_cache_locs": lambda t: cache_locs(t, assign_extend_cache_locs),
       "assign_req_to_token_pool": lambda t: cache_locs(t, assign_req_to_token_pool),
       "fill_accept_out_cache_loc": accept_out_cache_loc}


def run(given: dict) -> dict:
    op = given.pop("op", "greedy_walk")
    return OPS[op]({name: torch.tensor(value, dtype=torch.long) for name, value in given.items()})


if __name__ == "__main__":
    print_result([run(given) for given in json.loads(sys.argv[1])])
