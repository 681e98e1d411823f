"""SpecPC's draft runner on the tiny model: its window attention rows and look-ahead rows are eager
attention's, its scores are the rule's, a capacity >= the prompt's length changes nothing (greedy generation
through transformers is token-identical), and the CLI compresses a file."""

import json

import pytest
import torch

from afterburner.plugins.cli import main
from afterburner.plugins.vllm.specpc import compress
from afterburner.spec_decode.draft.specpc import SpecPCSettings, select, select_reference, step_scores_reference
from afterburner.spec_decode.draft.specpc_draft import compress_ids, draft_scores

TEXT = "Open the file and read every line; return a new list of the words it holds, sorted. " * 12


@pytest.mark.parametrize("lookahead,window,start", [(1, 64, 0), (4, 64, 1), (3, 16, 8), (1, 500, 0)])
def test_scores_equal_the_rule_on_eager_attention(draft, eager, lookahead, window, start):
    ids = draft.tokenizer(TEXT).input_ids
    length = len(ids)
    settings = SpecPCSettings(capacity=max(64, window), window=window, start_layer=start, lookahead=lookahead)
    scores, generated = draft_scores(draft.model, ids, settings)
    with torch.inference_mode():  # one eager pass over prompt + the fed-back look-ahead tokens
        out = eager(torch.tensor([ids + generated[:-1]]), output_attentions=True)
    assert out.logits[0, length - 1:].argmax(-1).tolist() == generated  # the same greedy look-ahead
    layers = [a[0] for a in out.attentions]  # [H, L + n - 1, L + n - 1] each
    start = min(start, len(layers) - 1)
    kw = dict(prompt_len=length, start_layer=start, weighted_query=True)
    expected = step_scores_reference([a[:, length - min(window, length):length] for a in layers], **kw)
    for step in range(lookahead - 1):
        expected = torch.maximum(expected, step_scores_reference([a[:, length + step:length + step + 1]
                                                                  for a in layers], **kw))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    kept = select(scores, settings)
    assert kept.tolist() == select_reference(scores, capacity=settings.capacity, window=window, kernel=64,
                                             neighbours=64).tolist()


def test_compression_keeps_capacity_and_the_last_window(draft):
    ids = draft.tokenizer(TEXT).input_ids
    result = compress_ids(draft, ids, SpecPCSettings(capacity=100, lookahead=2))
    assert len(result.token_ids) == 100 and result.kept == sorted(set(result.kept))
    assert result.token_ids == [ids[i] for i in result.kept] and result.kept[-64:] == list(range(len(ids) - 64,
                                                                                                   len(ids)))
    assert len(result.lookahead_ids) == 2


def test_full_capacity_is_token_identical_through_greedy_generation(tiny_model, draft, eager):
    prompts = [TEXT, "The module provides", TEXT[:200]]
    lengths = [len(draft.tokenizer(p).input_ids) for p in prompts]
    results = compress(tiny_model, prompts, capacity=max(lengths))
    with torch.inference_mode():
        for prompt, result in zip(prompts, results, strict=True):
            plain = draft.tokenizer(prompt, return_tensors="pt").input_ids
            assert result.token_ids == plain[0].tolist()
            compressed = torch.tensor([result.token_ids])
            kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=draft.tokenizer.eos_token_id)
            assert eager.generate(compressed, **kw).tolist() == eager.generate(plain, **kw).tolist()


def test_cli_compresses_a_file(tiny_model, tmp_path, capsys):
    source = tmp_path / "prompt.txt"
    source.write_text(TEXT)
    out = tmp_path / "ids.json"
    assert main(["compress", "--draft", str(tiny_model), "--capacity", "96", "--ids", "--out", str(out),
                 str(source)]) == 0
    assert len(json.loads(out.read_text())) == 96
    assert "kept 96 of" in capsys.readouterr().err
    assert main(["compress", "--draft", str(tiny_model), "--capacity", "8", str(source)]) == 2  # < window
