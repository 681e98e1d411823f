"""Triton kernels for selective paged attention at decode (one query token per sequence).

    selection      torch, no Triton: block_mask -> padded lists of selected logical blocks, and a
                   batched top-k selection straight into that form (device-friendly, no host syncs)
    quest_scores   Quest upper bounds per (sequence, kv head, logical block), read through the block table
    sparse_decode  split-K paged decode attention over the selected blocks only, with its merge step
    local_linear   Local Linear Attention's paged forward (statistics, in-kernel CG, apply pass);
                   spec: ``local_linear/reference.py``

The modules are imported on their own (this file imports nothing), so ``selection`` works without Triton
and importing the package never compiles or decorates a kernel. Specs: ``selective.py`` and
``sparse/quest.py``; tests/unit/attention_backends/test_triton_kernels.py runs the kernels under ``TRITON_INTERPRET=1``.
"""
