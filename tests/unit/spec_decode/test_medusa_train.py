"""Medusa self-distillation on the tiny model with a few hundred tokens: the base pass is what the model
computes, targets are the base distribution k positions ahead, training lowers the loss, a resumed run ends
with the same weights as an uninterrupted one, and the CLI's folder loads back."""

import json

import pytest
import torch

from afterburner.plugins.cli import main
from afterburner.plugins.lm_eval.text import local_sentences
from afterburner.spec_decode.medusa import distill_data
from afterburner.spec_decode.medusa.checkpoint import load_heads, load_shared_lm_head
from afterburner.spec_decode.medusa.train import (
    TrainConfig,
    TrainError,
    _SoftKL,
    evaluate,
    new_heads,
    positions,
    split_chunks,
    target_logprobs,
    train_heads,
)

TOKENS = 400
CONFIG = TrainConfig(num_heads=3, epochs=3, lr=3e-3, batch_size=64, seed=0, holdout=0.1, save_every=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def base(tiny_model, text_file, tmp_path_factory):
    model, tokenizer = distill_data.load_base(tiny_model)
    cache = tmp_path_factory.mktemp("work") / "base_pass.pt"
    base, cached = distill_data.load_or_build(model, tokenizer, tiny_model, [text_file], cache, seq_len=64,
                                              max_tokens=TOKENS, progress=False)
    assert not cached and len(base.tokens) == TOKENS
    again, cached = distill_data.load_or_build(model, tokenizer, tiny_model, [text_file], cache, seq_len=64,
                                               max_tokens=TOKENS, progress=False)
    assert cached and torch.equal(again.hidden, base.hidden)
    return model, base


def test_base_pass_is_what_the_lm_head_reads(base):
    model, base = base
    start, length = int(base.chunk_starts[1]), int(base.chunk_lengths[1])
    with torch.no_grad():
        logits = model(input_ids=base.tokens[None, start:start + length]).logits[0]
    lm_head = model.get_output_embeddings().weight
    torch.testing.assert_close(base.hidden[start:start + length] @ lm_head.T, logits, atol=1e-4, rtol=1e-4)
    pos = torch.tensor([start, start + 5])
    target = target_logprobs(base.hidden, pos, lm_head, 3, None)  # [K, P, V]
    for k in range(1, 4):
        torch.testing.assert_close(target[k - 1], torch.log_softmax(logits[[k, 5 + k]], -1), atol=1e-4, rtol=1e-4)


def test_chat_trains_on_the_assistant_turns_only(base, tiny_model):
    _, tokenizer = distill_data.load_base(tiny_model)
    chat = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    ids, trained = distill_data.tokenize_document(chat, tokenizer)
    # position t is trained when token t+1 is written by the assistant (the tiny template ends turns "</s>\n")
    written = [ids[t + 1] for t in range(len(ids) - 1) if trained[t]]
    assert tokenizer.decode(written) == "General Kenobi</s>\nYes.</s>\n"
    plain_ids, plain_trained = distill_data.tokenize_document("Hello there", tokenizer)
    assert all(plain_trained) and len(plain_trained) == len(plain_ids)


def test_soft_kl_gradient_matches_autograd():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    target = torch.log_softmax(torch.randn(2, 5, 11), -1)
    weights = torch.randn(2, 5)
    (_SoftKL.apply(logits, target) * weights).sum().backward()
    fast = logits.grad.clone()
    logits.grad = None
    reference = (target.exp() * (target - torch.log_softmax(logits, -1))).sum(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(fast, logits.grad)
    torch.testing.assert_close(_SoftKL.apply(logits, target), reference)


def test_training_lowers_the_distillation_loss(base, tmp_path):
    model, base = base
    lm_head = model.get_output_embeddings().weight.detach()
    train_chunks, held = split_chunks(base, num_heads=3, holdout=CONFIG.holdout, seed=0)
    assert held and not set(held) & set(train_chunks)
    train_pos = positions(base, train_chunks, 3)
    before = evaluate(new_heads(CONFIG, lm_head), base, train_pos, lm_head)
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": 10})  # the random model's next tokens take a while
    result = train_heads(base, lm_head, config=config, work_dir=tmp_path, progress=False)
    after = evaluate(result.heads, base, train_pos, lm_head)
    assert result.step == result.total_steps > 50
    assert all(a < 0.85 * b for a, b in zip(after["kl"], before["kl"], strict=True)), (before["kl"], after["kl"])
    assert sum(after["top1"]) > sum(before["top1"])
    assert result.before["positions"] == result.after["positions"] == result.holdout_positions > 0


def test_resume_gives_the_same_weights_as_one_run(base, tmp_path):
    model, base = base
    lm_head = model.get_output_embeddings().weight.detach()
    whole = train_heads(base, lm_head, config=CONFIG, work_dir=tmp_path / "whole", progress=False)
    # killed after 6 steps: the last checkpoint is step 4 (save_every=4), so the resumed run redoes 4..5
    cut = train_heads(base, lm_head, config=CONFIG, work_dir=tmp_path / "cut", progress=False, stop_after=6)
    assert cut.step == 6 and torch.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    cut_seconds = torch.load(tmp_path / "cut" / "checkpoint.pt")["seconds"]
    resumed = train_heads(base, lm_head, config=CONFIG, work_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed.resumed_from == 4 and resumed.step == whole.step
    # training time adds up over runs: re-resuming the finished run (as `make` does) does not reset it
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt")["seconds"]
    assert 0 < cut_seconds < saved <= resumed.seconds
    finished = train_heads(base, lm_head, config=CONFIG, work_dir=tmp_path / "cut", resume=True, progress=False)
    assert finished.resumed_from == whole.step and finished.seconds >= saved
    for (name, a), b in zip(whole.heads.state_dict().items(), resumed.heads.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.before == whole.before
    with pytest.raises(TrainError, match="other settings"):
        train_heads(base, lm_head, config=TrainConfig(**{**CONFIG.__dict__, "lr": 1e-3}),
                    work_dir=tmp_path / "cut", resume=True, progress=False)


def test_cli_trains_a_folder_that_loads_back(tiny_model, text_file, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    sentences = local_sentences()[100:110]
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in zip(sentences[::2], sentences[1::2], strict=True)))
    out = tmp_path / "heads"
    argv = ["train", "medusa", "--base", str(tiny_model), "--data", str(text_file), str(chat), "--out", str(out),
            "--max-tokens", "300", "--seq-len", "64", "--batch-size", "64", "--heads", "2", "--save-every", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "top-1 agreement" in first and "speculative-config" in first
    heads = load_heads(out)
    assert heads.config.num_heads == 2 and heads.config.shared_lm_head
    model, _ = distill_data.load_base(tiny_model)
    torch.testing.assert_close(load_shared_lm_head(out), model.get_output_embeddings().weight, rtol=0, atol=0)
    saved = torch.load(out.with_name("heads.train") / "checkpoint.pt")["heads"]
    for name, tensor in heads.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    config = json.loads((out / "config.json").read_text())["afterburner"]
    assert config["training"]["tokens"] == 300 and len(config["training"]["holdout_top1"]) == 2

    assert main([*argv, "--resume"]) == 0  # finished: reuses the base pass, trains no further
    again = capsys.readouterr().out
    assert "from the cache" in again and "resumed from step" in again


def test_bad_data_is_one_clear_line(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text field"}\n')
    assert main(["train", "medusa", "--base", str(tiny_model), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {bad}:2: expected an object with a 'text' string or a 'messages' list"
    assert main(["train", "medusa", "--base", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
