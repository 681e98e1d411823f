"""A drafter's vocabulary (``spec_decode/draft_vocab``): the ranking, its file, and the micro-step drafter
drafting from it (the full-vocabulary argmax whenever that lies inside, an id inside it always)."""

import pytest
import torch

from afterburner.spec_decode import draft_vocab
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter


def test_ranking_puts_written_tokens_first_then_the_rest_by_id():
    ranked = draft_vocab.rank_tokens([[5, 5, 7], [7, 7, 2], [9]], vocab_size=10)
    assert ranked.tolist() == [7, 5, 2, 9, 0, 1, 3, 4, 6, 8]
    assert draft_vocab.coverage(ranked, [[7, 7, 3, 0]], 2) == 0.5


def test_file_round_trip_and_one_line_errors(tmp_path):
    ranked = draft_vocab.rank_tokens([[3, 3, 1]], vocab_size=8)
    draft_vocab.save(tmp_path, ranked)
    assert draft_vocab.load(tmp_path, 2, 8).tolist() == [3, 1]
    with pytest.raises(draft_vocab.DraftVocabError, match="ranks only 8"):
        draft_vocab.load(tmp_path, 9, 8)
    with pytest.raises(draft_vocab.DraftVocabError, match="outside the vocabulary of 4"):
        draft_vocab.load(tmp_path, 2, 4)
    with pytest.raises(draft_vocab.DraftVocabError, match="has no draft_vocab.safetensors"):
        draft_vocab.load(tmp_path / "elsewhere", 2, 8)


def test_written_tokens_are_the_assistant_turns_of_a_chat():
    """A character tokenizer and a one-character-per-role chat template stand in for a real one."""

    class Chars:
        chat_template = "x"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role'][0]}>{m['content']}" for m in messages)
            return text + ("<a>" if add_generation_prompt else "")

    written = draft_vocab.written_tokens([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                          "ab"], Chars())
    assert written == [[ord("y"), ord("o")], [ord("b")]]


@pytest.mark.parametrize("seed", range(3))
def test_the_drafter_drafts_inside_its_vocabulary_and_agrees_where_it_can(seed):
    torch.manual_seed(seed)
    vocab, hidden = 64, 32
    config = DrafterConfig(base_hidden_size=hidden, vocab_size=vocab, feature_layers=(1, 2), hidden_size=32,
                           num_heads=2, num_kv_heads=2, head_dim=16, intermediate_size=64, max_micro_steps=4)
    embed, lm_head = torch.randn(vocab, hidden), torch.randn(vocab, hidden)
    features, last = torch.randn(5, 2, hidden), torch.randint(0, vocab, (5,))
    drafter = MicroStepDrafter(config).eval()
    full = drafter.attach_base(embed, lm_head).draft(features, last, max_tokens=4, stop_threshold=0.0)
    everything = torch.randperm(vocab)  # every token, in another order: the same drafts
    assert drafter.attach_base(embed, lm_head, everything).draft(features, last, max_tokens=4,
                                                                 stop_threshold=0.0) == full
    half = torch.arange(0, vocab, 2)
    limited = drafter.attach_base(embed, lm_head, half).draft(features, last, max_tokens=4, stop_threshold=0.0)
    assert all(token % 2 == 0 for row in limited for token in row)
    for row_full, row_limited in zip(full, limited, strict=True):  # identical up to the first odd full draft
        prefix = next((i for i, token in enumerate(row_full) if token % 2), len(row_full))
        assert row_limited[:prefix] == row_full[:prefix]
