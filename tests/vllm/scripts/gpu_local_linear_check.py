"""Local-linear attention in the GPU ``CUSTOM`` backend (plugins/vllm/gpu_attention.py) on CPU tensors, run
with ``TRITON_INTERPRET=1`` in a fresh process. Prints ``RESULT <json>``: the largest error against the
float64 reference (``local_linear_reference`` over each sequence's keys) of a prefill step, a decode-only
step and a mixed step (a decode row beside a 3-token chunk), the Impl's forward count, and the message of a
config whose output method has no Triton op. vLLM's Triton cache write is stood in for by torch
(custom_backend_setup.py); the attention itself is afterburner's Triton kernels, interpreted.
"""

import os
from types import SimpleNamespace

import torch

from afterburner.plugins.devtools.worker import print_result

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from custom_backend_setup import custom_impl, paged_cache  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata  # noqa: E402

from afterburner.attention_backends.local_linear.reference import local_linear_reference  # noqa: E402
from afterburner.attention_backends.selective import gather_sequence  # noqa: E402
from afterburner.plugins import stats  # noqa: E402

HQ, HKV, D, BS, NB = 4, 2, 16, 16, 12
LENS = [40, 21]
LAM = 0.5


def main():
    backend, vllm_config, impl = custom_impl({"attention": {"method": "local_linear", "local_linear": {"lam": LAM}}},
                                             heads=HQ, head_size=D, kv_heads=HKV, block_size=BS)
    gen = torch.Generator().manual_seed(0)
    kv_cache, table, slots = paged_cache(NB, BS, HKV, D, [3, 2], gen)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)

    def write(starts: list[int], ends: list[int]) -> torch.Tensor:
        """The keys and values of positions [start, end) of each sequence into the cache; their slots."""
        mapping = torch.cat([slots(b, range(s, e)) for b, (s, e) in enumerate(zip(starts, ends, strict=True))])
        n = mapping.shape[0]
        impl.do_kv_cache_update(layer, torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen),
                                kv_cache, mapping)
        return mapping

    def step(starts: list[int], ends: list[int]) -> float:
        """Write positions [start, end) of each sequence and attend with their queries; the largest error
        of the Impl's output against the float64 reference (and of the padded rows against 0)."""
        mapping = write(starts, ends)
        n = mapping.shape[0]
        query, out = torch.randn(n, HQ * D, generator=gen), torch.zeros(n + 2, HQ * D)  # padded rows stay 0
        counts = [e - s for s, e in zip(starts, ends, strict=True)]
        query_start = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor(ends, dtype=torch.int32)
        z = torch.zeros(1)
        metadata = TritonAttentionMetadata(
            num_actual_tokens=n, max_query_len=max(counts), query_start_loc=query_start, max_seq_len=max(ends),
            seq_lens=seq_lens, block_table=table, slot_mapping=mapping, seq_threshold_3D=0,
            num_par_softmax_segments=16, softmax_segm_output=z, softmax_segm_max=z, softmax_segm_expsum=z,
            causal=True)
        impl.forward(layer, torch.cat([query, torch.zeros(2, HQ * D)]), None, None, kv_cache, metadata, out)
        q = query.view(n, HQ, D)
        error = out[n:].abs().max().item()
        for b, e in enumerate(ends):
            rows = slice(int(query_start[b]), int(query_start[b + 1]))
            expected = local_linear_reference(q[rows], gather_sequence(k_cache, table[b], e),
                                              gather_sequence(v_cache, table[b], e), scale=D ** -0.5, lam=LAM)
            error = max(error, (out[rows].view(-1, HQ, D).double() - expected).abs().max().item())
        return error

    write([0, 0], [LENS[0] - 4, LENS[1] - 4])  # the prompts' first tokens (the interpreter is slow)
    prefill = step([LENS[0] - 4, LENS[1] - 4], [LENS[0] - 1, LENS[1] - 1])  # a 3-token chunk each: CG kernel
    decode = step([LENS[0] - 1, LENS[1] - 1], LENS)  # one query per sequence: the one-pass kernel
    mixed = step([LENS[0], LENS[1]], [LENS[0] + 1, LENS[1] + 3])  # a decode row beside a chunk: CG kernel

    refused = None
    with set_current_vllm_config(vllm_config):
        impl_cls = backend.get_impl_cls()
        from afterburner.attention_backends.local_linear.method import LocalLinearOutput

        triton_op = LocalLinearOutput.triton
        del LocalLinearOutput.triton  # an output method without a GPU path
        try:
            impl_cls(HQ, D, D ** -0.5, HKV, None, None, "auto")
        except Exception as exc:  # noqa: BLE001 - the message is the result
            refused = str(exc)
        finally:
            LocalLinearOutput.triton = triton_op
    print_result({"prefill_error": prefill, "decode_error": decode, "mixed_error": mixed,
                  "forward_calls": stats.attention("local_linear").as_dict()["forward_calls"], "refused": refused})


if __name__ == "__main__":
    main()
