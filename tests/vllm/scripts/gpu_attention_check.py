"""The GPU ``CUSTOM`` backend (plugins/vllm/gpu_attention.py) on CPU tensors, run with ``TRITON_INTERPRET=1``
in a fresh process (Triton reads it at import). Prints ``RESULT <json>``:
- ``custom_class``: what ``--attention-backend CUSTOM`` resolves to after afterburner's registration;
- ``h100_rejections``: vLLM's ``validate_configuration`` reasons for an H100, bf16, head 128 (none: usable);
- ``summaries_match``: the Impl's per-block min/max after a prefill and a decode write vs
  ``quest.summaries_from_cache`` over the cache;
- ``selected`` / ``expected_selected``: blocks read per (sequence, kv head), Impl vs torch Quest;
- ``max_error``: the Impl's decode output vs ``selective_attention_reference`` over the torch selection;
- ``mixed_decode_error`` / ``mixed_prefill_error``: a step with sequence 0 decoding beside sequence 1's
  prefill chunk: the decode row vs the sparse reference, the chunk's rows vs dense attention.
vLLM's own Triton kernels do not run on CPU, so the stock cache write and the stock attention are replaced
by torch stand-ins.
"""

import os
from types import SimpleNamespace

import torch

from afterburner.plugins.devtools.worker import print_result

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from custom_backend_setup import custom_impl, paged_cache  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl, TritonAttentionMetadata  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402

from afterburner.attention_backends.selective import selective_attention_reference  # noqa: E402
from afterburner.attention_backends.sparse import quest  # noqa: E402

HQ, HKV, D, BS, NB = 8, 2, 32, 16, 24
LENS = [100, 75]
TOKEN_BUDGET = 64  # 4 blocks of 16


def torch_stock_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args):
    """Stands in for vLLM's Triton attention: dense causal attention over the cache."""
    k_cache, v_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    n, m = attn_metadata.num_actual_tokens, attn_metadata
    q = query[:n].view(n, self.num_heads, self.head_size)
    result = selective_attention_reference(q, k_cache, v_cache, m.block_table, m.seq_lens, m.query_start_loc,
                                           scale=self.scale)
    output[:n] = result.reshape(output[:n].shape)
    return output


def quest_mask(q, kmin, kmax, table, lens):
    mask = torch.zeros(len(lens), HKV, table.shape[1], dtype=torch.bool)
    for b, length in enumerate(lens):
        n = -(-length // BS)
        scores = quest.block_scores(q[b:b + 1], kmin, kmax, table[b, :n])
        mask[b, :, :n] = quest.select_blocks(scores, budget=TOKEN_BUDGET // BS, sink_blocks=1, recent_blocks=1)
    return mask


def main():
    TritonAttentionImpl.forward = torch_stock_forward
    sparse = {"token_budget": TOKEN_BUDGET, "page_size": BS, "sink_pages": 1, "recent_pages": 1,
              "dense_below_tokens": 64, "dense_layers": 2}
    backend, _, impl = custom_impl({"attention": {"method": "sparse", "sparse": sparse}}, heads=HQ, head_size=D,
                                   kv_heads=HKV, block_size=BS)
    selector = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    rejections = backend.validate_configuration(device_capability=DeviceCapability(9, 0), **selector._asdict())
    gen = torch.Generator().manual_seed(0)
    kv_cache, table, slots = paged_cache(NB, BS, HKV, D, [7, 5], gen)

    layer = SimpleNamespace(layer_name="model.layers.3.self_attn.attn")
    prompt = torch.cat([slots(0, range(LENS[0] - 1)), slots(1, range(LENS[1] - 1)), torch.full((3,), -1)])
    keys = torch.randn(prompt.shape[0] + 5, HKV, D, generator=gen)  # padded past the slot mapping
    impl.do_kv_cache_update(layer, keys, torch.randn(keys.shape, generator=gen), kv_cache, prompt)
    step = torch.cat([slots(0, [LENS[0] - 1]), slots(1, [LENS[1] - 1])])
    impl.do_kv_cache_update(layer, torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen),
                            kv_cache, step)
    k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    fill = torch.zeros(NB, dtype=torch.long)
    for b, length in enumerate(LENS):
        for p in range(length):
            fill[int(table[b, p // BS])] += 1
    kmin, kmax = quest.summaries_from_cache(k_cache, fill)
    used = fill > 0
    ours_min, ours_max = impl.selector.summaries(3)  # layer 3: the layer's name below
    summaries_match = torch.equal(ours_min[used], kmin[used]) and torch.equal(ours_max[used], kmax[used])

    query, out = torch.randn(2, HQ * D, generator=gen), torch.zeros(2, HQ * D)
    z = torch.zeros(1)
    seq_lens = torch.tensor(LENS, dtype=torch.int32)
    metadata = TritonAttentionMetadata(
        num_actual_tokens=2, max_query_len=1, query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        max_seq_len=max(LENS), seq_lens=seq_lens, block_table=table, slot_mapping=step, seq_threshold_3D=0,
        num_par_softmax_segments=16, softmax_segm_output=z, softmax_segm_max=z, softmax_segm_expsum=z, causal=True)
    impl.forward(layer, query, None, None, kv_cache, metadata, out)
    first_out = out

    q = query.view(2, HQ, D)
    mask = quest_mask(q, kmin, kmax, table, LENS)
    expected = selective_attention_reference(q, k_cache, v_cache, table, seq_lens, torch.tensor([0, 1, 2]),
                                             scale=D ** -0.5, block_mask=mask)
    from afterburner.plugins import stats

    selected = stats.attention("sparse").as_dict()
    # A mixed step: sequence 0 decodes one more token while sequence 1 prefills a chunk of 3.
    mixed_lens = [LENS[0] + 1, LENS[1] + 3]
    step = torch.cat([slots(0, [LENS[0]]), slots(1, range(LENS[1], LENS[1] + 3))])
    impl.do_kv_cache_update(layer, torch.randn(4, HKV, D, generator=gen), torch.randn(4, HKV, D, generator=gen),
                            kv_cache, step)
    for b, length in enumerate(LENS):
        for p in range(length, mixed_lens[b]):
            fill[int(table[b, p // BS])] += 1
    kmin, kmax = quest.summaries_from_cache(k_cache, fill)
    query, out = torch.randn(4, HQ * D, generator=gen), torch.zeros(4, HQ * D)
    starts, mixed_seq = torch.tensor([0, 1, 4], dtype=torch.int32), torch.tensor(mixed_lens, dtype=torch.int32)
    mixed = TritonAttentionMetadata(
        num_actual_tokens=4, max_query_len=3, query_start_loc=starts, max_seq_len=max(mixed_lens),
        seq_lens=mixed_seq, block_table=table, slot_mapping=step, seq_threshold_3D=0, num_par_softmax_segments=16,
        softmax_segm_output=z, softmax_segm_max=z, softmax_segm_expsum=z, causal=True)
    impl.forward(layer, query, None, None, kv_cache, mixed, out)
    q = query.view(4, HQ, D)
    decode_mask = quest_mask(q[:1], kmin, kmax, table[:1], mixed_lens[:1])
    sparse_row = selective_attention_reference(q[:1], k_cache, v_cache, table[:1], mixed_seq[:1],
                                               torch.tensor([0, 1]), scale=D ** -0.5, block_mask=decode_mask)
    dense_rows = selective_attention_reference(q[1:], k_cache, v_cache, table[1:], mixed_seq[1:],
                                               torch.tensor([0, 3]), scale=D ** -0.5)
    after = stats.attention("sparse").as_dict()

    print_result({
        "custom_class": f"{backend.__module__}.{backend.__qualname__}", "h100_rejections": rejections,
        "summaries_match": summaries_match, "stats": selected, "after_mixed": after,
        "expected_selected": mask.sum(-1).tolist(),
        "max_error": (first_out.view(2, HQ, D) - expected).abs().max().item(),
        "mixed_decode_error": (out.view(4, HQ, D)[:1] - sparse_row).abs().max().item(),
        "mixed_prefill_error": (out.view(4, HQ, D)[1:] - dense_rows).abs().max().item(),
        "mixed_dense_differs": (sparse_row - selective_attention_reference(
            q[:1], k_cache, v_cache, table[:1], mixed_seq[:1], torch.tensor([0, 1]), scale=D ** -0.5)
        ).abs().max().item(),
    })


if __name__ == "__main__":
    main()
