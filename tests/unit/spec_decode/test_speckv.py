"""SpecKV's rule and draft runner: the vectorised choice equals the loop spec and the paper's ``compress_kv``
math (a direct transcription below), the draft's streamed scores equal one eager pass over prompt +
look-ahead, a draft made of the target's first layers scores those layers exactly as the target would, and
the decode reference keeps greedy output when everything is kept."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from afterburner.spec_decode.draft.derive import derive_draft
from afterburner.spec_decode.draft.speckv import SpecKVSettings, keep_mask, keep_reference, layer_masks, reduce_rows
from afterburner.spec_decode.draft.speckv_draft import draft_layer_scores, speckv_keep
from afterburner.spec_decode.draft.speckv_reference import ATTENTION, greedy_with_kept, register_attention
from afterburner.spec_decode.draft.specpc_draft import load_draft

TEXT = "Open the file and read every line; return a new list of the words it holds, sorted. " * 12


def paper_compress_indices(query: torch.Tensor, key: torch.Tensor, *, window: int, capacity: int,
                           kernel: int) -> tuple[list[set[int]], torch.Tensor]:
    """The paper's ``compress_kv`` selection (speckv/util.py), transcribed: query [H, T, D], key [Hkv, T, D]
    over prompt + look-ahead, window = its W' (window + look-ahead + 1), capacity its C + look-ahead + 1;
    returns each kv head's top indices and the pooled scores they were ranked by."""
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    scores = query[:, -window:] @ key.repeat_interleave(groups, dim=0).transpose(1, 2) / math.sqrt(dim)
    scores[:, -window:, -window:] += torch.full((window, window), torch.finfo(scores.dtype).min).triu(1)
    scores = scores.softmax(dim=-1, dtype=torch.float32)[:, -window:, :-window]
    scores = scores.reshape(kv_heads, groups * window, -1).max(dim=1).values
    scores = F.max_pool1d(scores[None], kernel_size=kernel, padding=kernel // 2, stride=1)[0]
    top = scores.topk(min(capacity - window, scores.shape[-1]), dim=-1).indices
    return [set(row.tolist()) for row in top], scores


@pytest.mark.parametrize("seed,length,capacity,window,kernel,heads", [
    (0, 200, 64, 32, 7, 3), (1, 97, 40, 8, 3, 2), (2, 50, 49, 0, 1, 1), (3, 300, 100, 32, 9, 4),
    (4, 120, 119, 32, 7, 2)])
def test_keep_mask_equals_the_loop_spec(seed, length, capacity, window, kernel, heads):
    settings = SpecKVSettings(capacity=capacity, window=window, kernel=kernel)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (heads, settings.scored_keys(length)), generator=generator).float()  # many ties
    fast = keep_mask(scores, prompt_len=length, settings=settings)
    assert torch.equal(fast, keep_reference(scores.tolist(), prompt_len=length, settings=settings))
    assert fast.sum(dim=1).tolist() == [min(capacity + 1, length)] * heads  # C - window top + the last window + 1
    assert fast[:, length - window - 1:].all()


def test_a_prompt_within_capacity_keeps_everything():
    settings = SpecKVSettings(capacity=64, window=32)
    assert keep_mask(torch.rand(2, 0), prompt_len=64, settings=settings).all()


@pytest.mark.parametrize("seed,lookahead", [(0, 1), (1, 5), (2, 12)])
def test_choice_equals_the_papers_compress_kv(seed, lookahead):
    generator = torch.Generator().manual_seed(seed)
    prompt, heads, kv_heads, dim = 180, 4, 2, 16
    settings = SpecKVSettings(capacity=60, window=16, kernel=7, lookahead=lookahead)
    query = torch.randn(heads, prompt + lookahead, dim, generator=generator)
    key = torch.randn(kv_heads, prompt + lookahead, dim, generator=generator)
    rows = settings.window + lookahead + 1  # the paper's window_size for SpecKV
    expected, pooled = paper_compress_indices(query, key, window=rows, capacity=settings.capacity + lookahead + 1,
                                      kernel=settings.kernel)
    # ours: the same rows' causal softmax, reduced per kv head over the scored keys
    logits = query[:, -rows:] @ key.repeat_interleave(2, dim=0).transpose(1, 2) / math.sqrt(dim)
    total = prompt + lookahead
    causal = torch.arange(total)[None, :] > torch.arange(total - rows, total)[:, None]
    softmax = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    scores = reduce_rows(softmax, kv_heads, settings.scored_keys(prompt))
    mask = keep_mask(scores, prompt_len=prompt, settings=settings)
    scored = settings.scored_keys(prompt)
    ours = [set(torch.nonzero(m[:scored]).flatten().tolist()) for m in mask]
    for head, (mine, theirs) in enumerate(zip(ours, expected, strict=True)):
        # max-pooling repeats a peak over its neighbours, so top-k ties are common and the paper's topk breaks
        # them unspecified: the same count and the same ranked values is the same choice
        assert len(mine) == len(theirs) == settings.capacity - settings.window
        values = pooled[head]
        assert sorted(values[list(mine)].tolist()) == sorted(values[list(theirs)].tolist())
        assert len(mine ^ theirs) <= 2 * int((values == values[list(theirs)].min()).sum())


def test_layers_beyond_the_draft_share_its_last_layers_choice():
    settings = SpecKVSettings(capacity=20, window=4, kernel=3)
    scores = [torch.rand(2, settings.scored_keys(50)) for _ in range(2)]
    masks = layer_masks(scores, target_layers=4, prompt_len=50, settings=settings)
    assert masks.shape == (4, 2, 50)
    assert torch.equal(masks[1], keep_mask(scores[1], prompt_len=50, settings=settings))
    shared = keep_mask(scores[1].amax(0, keepdim=True), prompt_len=50, settings=settings)
    assert torch.equal(masks[2], shared.expand(2, -1)) and torch.equal(masks[3], masks[2])


def _eager_scores(eager, ids, lookahead_ids, settings):
    """The paper's target-side scoring: one eager pass over prompt + the whole look-ahead."""
    with torch.inference_mode():
        out = eager(torch.tensor([ids + lookahead_ids]), output_attentions=True)
    rows = settings.window + len(lookahead_ids) + 1
    kv_heads = eager.config.num_key_value_heads
    return out, [reduce_rows(a[0][:, -rows:], kv_heads, settings.scored_keys(len(ids))) for a in out.attentions]


@pytest.mark.parametrize("lookahead,window", [(1, 32), (6, 16), (3, 0), (0, 32)])
def test_draft_scores_equal_one_eager_pass_over_prompt_and_lookahead(draft, eager, lookahead, window):
    ids = draft.tokenizer(TEXT).input_ids
    settings = SpecKVSettings(capacity=window + 40, window=window, lookahead=lookahead)
    scores, generated = draft_layer_scores(draft.model, ids, settings)
    assert len(generated) == lookahead
    out, expected = _eager_scores(eager, ids, generated, settings)
    assert out.logits[0, len(ids) - 1:-1].argmax(-1).tolist() == generated  # the same greedy look-ahead
    for ours, theirs in zip(scores, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_truncated_draft_scores_its_layers_as_the_target(tiny_model, eager, tmp_path, one_torch_thread):
    first = load_draft(derive_draft(tiny_model, tmp_path / "l1", layers=1))
    ids = first.tokenizer(TEXT).input_ids
    settings = SpecKVSettings(capacity=72, window=32, lookahead=4)
    scores, generated = draft_layer_scores(first.model, ids, settings)
    _, target = _eager_scores(eager, ids, generated, settings)  # the target reads the draft's look-ahead
    torch.testing.assert_close(scores[0], target[0], atol=1e-5, rtol=0)
    kept = speckv_keep(first, ids, settings, target_layers=2)
    assert kept.mask.shape == (2, 2, len(ids)) and kept.lookahead_ids == generated
    assert torch.equal(kept.mask[0], keep_mask(target[0], prompt_len=len(ids), settings=settings))


def test_reference_decoding_over_everything_is_plain_greedy(tiny_model, eager):
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=ATTENTION).eval()
    ids = list(range(5, 105))
    full = torch.ones(2, 2, len(ids), dtype=torch.bool)
    with torch.inference_mode():
        plain = eager.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert greedy_with_kept(model, ids, full, 12) == plain
    dropped = full.clone()
    dropped[:, :, :90] = False  # only the last 10 prompt entries: the output must change
    assert greedy_with_kept(model, ids, dropped, 12) != plain
