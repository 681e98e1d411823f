"""The EAGLE-3 drafter (spec_decode/eagle3) on small tensors and the tiny model: the teacher-forced unroll
is what greedy drafting computes and keeps EAGLE-3's visibility (step-1 entries causal, later draft steps
only their own slot's), the self-attention init copies the current token, the folder is vLLM's layout and
loads back, training lowers the loss and resumes exactly, the CLI writes a folder, and the reference
decoder is greedy decoding."""

import json

import pytest
import torch

from afterburner.plugins.cli import main
from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.eagle3.folder import load_eagle3, save_eagle3
from afterburner.spec_decode.eagle3.reference import eagle3_generate
from afterburner.spec_decode.eagle3.train import evaluate, residual_init, self_attention_init, train_eagle3
from afterburner.spec_decode.hamburger.drafter import DrafterConfig
from afterburner.spec_decode.hamburger.train import TrainConfig, base_norm_init, drafter_config_for
from afterburner.spec_decode.medusa import distill_data
from afterburner.spec_decode.medusa.train import TrainError, split_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

SMALL = DrafterConfig(base_hidden_size=32, vocab_size=50, feature_layers=(1, 2, 3), hidden_size=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=64, max_micro_steps=3)
CONFIG = TrainConfig(steps=8, lr=3e-3, batch_size=2, seed=0, holdout=0.1, save_every=3)


def _small(seed=0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    return Eagle3Drafter(SMALL).attach_base(torch.randn(50, 32), torch.randn(50, 32)).eval()


def test_greedy_drafting_is_the_unroll_fed_its_own_drafts():
    drafter, g = _small(), torch.Generator().manual_seed(1)
    features, tokens = torch.randn(9, 3, 32, generator=g), torch.randint(0, 50, (9,), generator=g)
    drafts = drafter.draft(features, tokens, 3)
    with torch.no_grad():
        unrolled = drafter.unroll(features[None], torch.cat([tokens, torch.tensor(drafts[:2])])[None], 3)
    assert [int(unrolled[m, 0, -1].argmax()) for m in range(3)] == drafts
    vocab = torch.arange(0, 50, 7)
    assert all(d in vocab.tolist() for d in drafter.draft(features, tokens, 3, vocab_ids=vocab))


def test_a_stop_threshold_cuts_the_chain_before_its_first_unconfident_draft():
    """The chain with a stop is the full chain's prefix up to (not including) its first draft whose probability
    (softmax over the drafting vocabulary) is below the threshold; 0 never cuts."""
    drafter, g = _small(), torch.Generator().manual_seed(1)
    vocab = torch.arange(0, 50, 3)
    cut_somewhere = False
    for _ in range(12):
        features, tokens = torch.randn(9, 3, 32, generator=g), torch.randint(0, 50, (9,), generator=g)
        for ids in (None, vocab):
            full = drafter.draft(features, tokens, 3, vocab_ids=ids)
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=0.0) == full
            with torch.no_grad():
                unrolled = drafter.unroll(features[None], torch.cat([tokens, torch.tensor(full[:2])])[None], 3)
            scores = unrolled[:, 0, -1] if ids is None else unrolled[:, 0, -1][:, ids]
            probabilities = scores.softmax(-1).max(-1).values.tolist()  # each step's, given the full chain
            lowest, second = sorted(probabilities)[:2]
            threshold = (lowest + second) / 2  # cuts before the least confident draft (no rounding ties)
            kept = next((m for m, p in enumerate(probabilities) if p < threshold), 3)
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=threshold) == full[:kept]
            cut_somewhere |= kept < 3
    assert cut_somewhere


def test_unroll_sees_earlier_step1_entries_and_only_its_own_draft_steps():
    drafter, g = _small(), torch.Generator().manual_seed(2)
    features, tokens = torch.randn(1, 10, 3, 32, generator=g), torch.randint(0, 50, (1, 12), generator=g)
    with torch.no_grad():
        whole = drafter.unroll(features, tokens, 3)
        changed = tokens.clone()
        changed[0, 7] = (changed[0, 7] + 1) % 50  # step 1's token at slot 7, step 2's at 6, step 3's at 5
        other = drafter.unroll(features, changed, 3)
    same = (whole - other).abs().amax(-1)[:, 0] < 1e-6  # [steps, slots]
    assert same[0, :7].all() and not same[0, 7:].any()  # step 1: slots before 7 cannot see slot 7
    assert same[1, :6].all() and not same[1, 6]  # step 2 at 6 reads the token; before 6 nothing sees it
    assert same[2, :5].all() and not same[2, 5]


def test_the_self_attention_init_copies_the_current_token():
    config = DrafterConfig(**{**SMALL.to_dict(), "hidden_size": 64, "base_hidden_size": 64, "head_dim": 16})
    drafter = Eagle3Drafter(config)
    drafter.load_state_dict(self_attention_init(config, torch.Generator().manual_seed(0), 3.0), strict=False)
    layer, g = drafter.midlayer, torch.Generator().manual_seed(3)
    layer.mlp.down_proj.weight.data.zero_()  # pre = hidden + the attention's output
    drafter.attach_base(torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g))
    tokens, hidden = torch.randint(0, 50, (1, 12), generator=g), torch.randn(1, 12, 64, generator=g)
    with torch.no_grad():
        pre, _ = drafter._step(tokens, hidden, torch.arange(12), torch.arange(12), None, [])
        x = torch.cat([layer.input_layernorm(torch.nn.functional.embedding(tokens, drafter.embed_weight)),
                       layer.hidden_norm(hidden)], -1)
        own_value = layer.self_attn.v_proj(x).view(1, 12, 2, 16).repeat_interleave(2, 2).reshape(1, 12, 64)
        expected = layer.self_attn.o_proj(own_value)  # every head reading only its own position
    assert expected.norm(dim=-1).min() > 0.5  # a real signal: the token's embedding, projected
    torch.testing.assert_close(pre - hidden, expected, atol=0.05, rtol=0.05)


def test_the_folder_is_vllms_layout_and_loads_back(tmp_path):
    drafter = _small()
    vocab = torch.tensor([5, 1, 40, 7])
    folder = save_eagle3(tmp_path / "e3", drafter, max_position_embeddings=128, vocab_ids=vocab)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and config["fc_norm"] is True
    assert config["draft_vocab_size"] == 4 and config["target_hidden_size"] == 32
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (32, 64)  # reads [embedding, hidden]
    assert torch.equal(tensors["d2t"] + torch.arange(4), vocab)
    torch.testing.assert_close(tensors["lm_head.weight"], drafter.lm_head_weight[vocab])
    loaded, ids = load_eagle3(folder)
    assert torch.equal(ids, vocab)
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    whole = save_eagle3(tmp_path / "whole", drafter, max_position_embeddings=128)
    assert "lm_head.weight" not in load_file(str(whole / "model.safetensors"))  # vLLM shares the target's
    assert load_eagle3(whole)[1] is None


@pytest.fixture(scope="module")
def base(tiny_model, text_file, tmp_path_factory):
    model, tokenizer = distill_data.load_base(tiny_model)
    base, _ = distill_data.load_or_build(model, tokenizer, tiny_model, [text_file], tmp_path_factory.mktemp("w")
                                         / "pass.pt", seq_len=64, max_tokens=400, progress=False, feature_layers=(1,))
    embed, lm_head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    return model, base, embed, lm_head


def test_training_lowers_the_loss_and_resumes_exactly(base, tmp_path):
    model, base, embed, lm_head = base
    config = drafter_config_for(model.config, (1,), max_micro_steps=3)
    init = residual_init(config, base_norm_init(model, config))
    kwargs = dict(drafter_config=config, config=CONFIG, progress=False, init=init)
    whole = train_eagle3(base, embed, lm_head, work_dir=tmp_path / "whole", **kwargs)
    train_chunks, _ = split_chunks(base, num_heads=3, holdout=CONFIG.holdout, seed=0)
    torch.manual_seed(0)
    start = Eagle3Drafter(config).attach_base(embed, lm_head)
    start.load_state_dict(init, strict=False)
    before, after = (evaluate(d, base, train_chunks, lm_head)["kl"] for d in (start, whole.drafter))
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert whole.after["positions"] > 0 and len(whole.after["top1"]) == 3
    cut = train_eagle3(base, embed, lm_head, work_dir=tmp_path / "cut", stop_after=4, **kwargs)
    assert cut.step == 4 and torch.load(tmp_path / "cut" / "eagle3_checkpoint.pt")["step"] == 3
    resumed = train_eagle3(base, embed, lm_head, work_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.resumed_from == 3 and resumed.step == 8
    for (name, a), b in zip(whole.drafter.state_dict().items(), resumed.drafter.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(TrainError, match="other settings"):
        train_eagle3(base, embed, lm_head, work_dir=tmp_path / "cut", resume=True, progress=False, init=init,
                     drafter_config=config, config=TrainConfig(**{**CONFIG.__dict__, "lr": 1e-3}))


def test_the_reference_decoder_is_greedy_decoding_and_accepts_agreeing_drafts(base):
    """The drafter replaced by one that knows the greedy continuation and spoils its last draft: every step
    accepts exactly num_tokens - 1; the drafter reads the base's features at 0..L-2 and the tokens ids[1:]."""
    model, _, embed, lm_head = base
    config = drafter_config_for(model.config, (1,), max_micro_steps=3)
    drafter = Eagle3Drafter(config).attach_base(embed, lm_head).eval()
    prompt = torch.tensor([1, 17, 42, 9, 33])
    with torch.no_grad():
        plain = model.generate(prompt[None], max_new_tokens=30, do_sample=False)[0].tolist()
    calls = []

    def oracle(features, tokens, num_tokens, vocab_ids=None, stop_threshold=None, stop_head=None, min_tokens=0):
        calls.append((features, tokens))
        done = len(tokens) + 1  # ids so far
        return plain[done:done + num_tokens - 1] + [(plain[done + num_tokens - 1] + 1) % config.vocab_size]

    drafter.draft = oracle
    new, accepted = eagle3_generate(model, drafter, prompt, 20, num_tokens=3)
    assert new == plain[len(prompt):len(prompt) + 20] and accepted == [2] * len(accepted) and len(accepted) >= 6
    features, tokens = calls[1]
    assert tokens.tolist() == plain[1:len(tokens) + 1]
    with torch.no_grad():
        hidden = model(torch.tensor(plain[:len(tokens) + 1])[None], output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(features[:, 0], hidden[:-1], atol=1e-5, rtol=1e-5)


def test_cli_writes_a_folder_and_refuses_two_layers(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "eagle3"
    argv = ["train", "eagle3", "--base", str(tiny_model), "--data", str(text_file), "--out", str(out),
            "--max-tokens", "300", "--seq-len", "64", "--steps", "3", "--threads", "1", "--residual-init"]
    assert main(argv) == 0
    assert "EAGLE-3 drafter ->" in capsys.readouterr().out
    drafter, vocab = load_eagle3(out)
    assert drafter.config.feature_layers == (1,) and vocab is None
    assert json.loads((out / "config.json").read_text())["afterburner_eagle3"]["training"]["steps"] == 3
    assert main([*argv, "--layers", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: an EAGLE-3 drafter has one decoder layer (--layers 1)"
