"""A learned stop head on a frozen EAGLE-3 drafter (spec_decode/stop_head.py, eagle3/stop_train.py): the
confidence it reads ignores tokens outside a drafting vocabulary, the head (not the draft probability) cuts
the chain, the examples' labels are the drafter's agreement with the base, training ranks held-out drafts
better than chance, the head is tied to the drafter weights it was fitted on, and the CLI writes it."""

import dataclasses
import json

import pytest
import torch

from afterburner.plugins.cli import main
from afterburner.spec_decode import draft_vocab
from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.eagle3.folder import (
    Eagle3FolderError,
    load_eagle3,
    load_stop_head,
    save_eagle3,
    save_stop_head,
)
from afterburner.spec_decode.eagle3.stop_train import StopTrainConfig, collect, train_stop_head
from afterburner.spec_decode.eagle3.train import residual_init, train_eagle3
from afterburner.spec_decode.hamburger.drafter import DrafterConfig
from afterburner.spec_decode.hamburger.train import TrainConfig, base_norm_init, drafter_config_for
from afterburner.spec_decode.medusa import distill_data
from afterburner.spec_decode.medusa.train import chunk_positions, split_chunks
from afterburner.spec_decode.stop_head import StopHead, confidence_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

SMALL = DrafterConfig(base_hidden_size=32, vocab_size=50, feature_layers=(1, 2, 3), hidden_size=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=64, max_micro_steps=3)


def _small(seed=0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    return Eagle3Drafter(SMALL).attach_base(torch.randn(50, 32), torch.randn(50, 32)).eval()


def test_confidence_ignores_tokens_outside_the_drafting_vocabulary():
    """vLLM's EAGLE-3 with d2t gives -inf outside its vocabulary; the features equal the restricted logits'."""
    g = torch.Generator().manual_seed(0)
    logits, vocab = torch.randn(4, 50, generator=g) * 3, torch.arange(0, 50, 3)
    masked = torch.full_like(logits, float("-inf"))
    masked[:, vocab] = logits[:, vocab]
    torch.testing.assert_close(confidence_features(masked), confidence_features(logits[:, vocab]))
    uniform = confidence_features(torch.zeros(1, 8))[0]
    torch.testing.assert_close(uniform, torch.tensor([-torch.log(torch.tensor(8.0)), torch.log(torch.tensor(8.0))]))


def _constant_head(logit: float) -> StopHead:
    head = StopHead(SMALL.hidden_size).reset()
    torch.nn.init.zeros_(head[2].weight)
    torch.nn.init.constant_(head[2].bias, logit)
    return head


def test_the_stop_head_not_the_draft_probability_cuts_the_chain():
    """With a head the chain is the full chain's prefix up to its first draft of P(accepted) below the
    threshold, whatever the draft probability says: a head that always accepts keeps every draft at a
    threshold the probability stop cuts at; one that never does keeps none."""
    drafter, g = _small(), torch.Generator().manual_seed(1)
    vocab = torch.arange(0, 50, 3)
    head = StopHead(SMALL.hidden_size).reset(torch.Generator().manual_seed(3))
    cut_midway = False
    for _ in range(12):
        features, tokens = torch.randn(9, 3, 32, generator=g), torch.randint(0, 50, (9,), generator=g)
        for ids in (None, vocab):
            full = drafter.draft(features, tokens, 3, vocab_ids=ids)
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=1.0,
                                 stop_head=_constant_head(20.0)) == full
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=0.5,
                                 stop_head=_constant_head(-20.0)) == []
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=0.5, min_tokens=2,
                                 stop_head=_constant_head(-20.0)) == full[:2]  # the first two kept whatever
            assert len(drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=1.0)) == 0  # probability < 1
            with torch.no_grad():
                pre = drafter.unroll_states(features[None], torch.cat([tokens, torch.tensor(full[:2])])[None], 3)
                states = drafter.norm(pre[:, 0, -1])
                logits = drafter.logits(pre[:, 0, -1])
                p = head.p_accept(states, logits if ids is None else logits[:, ids]).tolist()
            lowest, second = sorted(p)[:2]
            threshold = (lowest + second) / 2
            kept = next((m for m, q in enumerate(p) if q < threshold), 3)
            assert drafter.draft(features, tokens, 3, vocab_ids=ids, stop_threshold=threshold, stop_head=head) \
                == full[:kept]
            cut_midway |= 0 < kept < 3
    assert cut_midway


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A drafter trained briefly on the tiny model's own greedy continuations (so that its drafts are accepted
    often enough for both labels to occur held out)."""
    model, tokenizer = distill_data.load_base(tiny_model)
    root = tmp_path_factory.mktemp("stop")
    lines = []
    for i in range(24):
        ids = torch.tensor([tokenizer(f"line {i}: x{i} is {i * 7 % 13}, and")["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)[0]
        lines.append(json.dumps({"text": tokenizer.decode(out, skip_special_tokens=True)}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    base, _ = distill_data.load_or_build(model, tokenizer, tiny_model, [root / "corpus.jsonl"], root / "pass.pt",
                                         seq_len=64, max_tokens=None, progress=False, feature_layers=(1,))
    embed, lm_head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    config = drafter_config_for(model.config, (1,), max_micro_steps=3)
    drafter = train_eagle3(base, embed, lm_head, drafter_config=config, work_dir=root / "train", progress=False,
                           config=TrainConfig(steps=12, lr=3e-3, batch_size=2, seed=0, holdout=0.2, save_every=10**6),
                           init=residual_init(config, base_norm_init(model, config))).drafter.eval()
    return base, drafter, lm_head, root


def test_examples_label_the_first_draft_by_the_drafters_agreement_with_the_base(trained):
    """Step 1's label at slot t, checked against greedy drafting from the prefix (``draft``) and the base's
    argmax at t+1; every slot has a step-1 example; later steps only where the fed tokens were the base's."""
    base, drafter, lm_head, _ = trained
    chunk = split_chunks(base, num_heads=3, holdout=0.2, seed=0)[0][0]
    examples = collect(drafter, base, [chunk], lm_head)
    start = int(base.chunk_starts[chunk])
    pos = chunk_positions(base, chunk, 3)
    first = examples.steps == 0
    assert int(first.sum()) == len(pos)
    # fed the base's own argmax everywhere, every draft step of every slot is an example, labels cumulative
    argmax = (base.hidden @ lm_head.float().T).argmax(-1)
    greedy = collect(drafter, dataclasses.replace(base, tokens=torch.cat([base.tokens[:1], argmax[:-1]])), [chunk],
                     lm_head)
    assert len(greedy) == 3 * len(pos) and greedy.steps.view(len(pos), 3).tolist() == [[0, 1, 2]] * len(pos)
    labels = greedy.labels.view(len(pos), 3)
    assert (labels[:, 1:] <= labels[:, :-1]).all() and labels[:, 0].any()
    for i, t in enumerate(pos.tolist()[:6]):
        slot = t - start
        draft = drafter.draft(base.features[start:t + 1], base.tokens[start + 1:t + 2], 1)[0]
        expected = draft == int((base.hidden[t + 1] @ lm_head.float().T).argmax())
        assert bool(examples.labels[first][i]) == expected, slot
    assert examples.labels.any() and not examples.labels.all()


def test_the_fitted_head_ranks_held_out_drafts_and_is_tied_to_its_drafter(trained):
    base, drafter, lm_head, root = trained
    result = train_stop_head(drafter, base, lm_head, config=StopTrainConfig(epochs=40, holdout=0.2), progress=False)
    held = result.holdout
    assert result.train_examples > 0 and held["examples"] > 0
    assert held["head_auc"] is not None and held["head_auc"] > 0.6, held
    assert 0 < held["label_rate"] < 1 and held["confidence_auc"] is not None
    folder = save_eagle3(root / "e3", drafter, max_position_embeddings=128)
    save_stop_head(folder, result.head, provenance={"holdout": held})
    loaded = load_stop_head(folder)
    for name, tensor in result.head.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    other = save_eagle3(root / "other", _retrained(drafter), max_position_embeddings=128)
    (other / "stop_head").mkdir()
    for f in ("config.json", "model.safetensors"):
        (other / "stop_head" / f).write_bytes((folder / "stop_head" / f).read_bytes())
    with pytest.raises(Eagle3FolderError, match="fitted on other drafter weights"):
        load_stop_head(other)
    with pytest.raises(Eagle3FolderError, match="has no stop head"):
        load_stop_head(root / "train")


def _retrained(drafter: Eagle3Drafter) -> Eagle3Drafter:
    changed = Eagle3Drafter(drafter.config).attach_base(drafter.embed_weight, drafter.lm_head_weight)
    changed.load_state_dict(drafter.state_dict())
    with torch.no_grad():
        changed.fc.weight.add_(1e-3)
    return changed


def test_cli_fits_a_head_into_the_folder(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "eagle3"
    common = ["--base", str(tiny_model), "--data", str(text_file), "--max-tokens", "400", "--seq-len", "64",
              "--threads", "1"]
    assert main(["train", "eagle3", *common, "--out", str(out), "--steps", "4", "--residual-init",
                 "--holdout", "0.2"]) == 0
    capsys.readouterr()
    assert main(["train", "eagle3-stop", "--eagle3", str(out), *common, "--epochs", "5"]) == 0
    printed = capsys.readouterr().out
    assert "base pass: " in printed and "from the cache" in printed  # train eagle3's work dir, reused
    assert "held-out ROC AUC for 'accepted': head" in printed
    meta = json.loads((out / "stop_head" / "config.json").read_text())["afterburner_stop_head"]
    assert meta["training"]["config"]["holdout"] == 0.2  # the drafter's own held-out split
    assert load_stop_head(out).hidden_size == meta["hidden_size"]
    assert main(["train", "eagle3-stop", "--eagle3", str(out), *common, "--draft-vocab", "64"]) == 2
    assert capsys.readouterr().err.strip() == "error: --draft-vocab and --ranking go together"

    # --draft-vocab: the head goes into the drafting copy EAGLE3-vocabN (written from --ranking's first N tokens)
    ranking = tmp_path / "ranking"
    ranking.mkdir()
    ranked = torch.randperm(load_eagle3(out)[0].config.vocab_size, generator=torch.Generator().manual_seed(0))
    draft_vocab.save(ranking, ranked)
    argv = ["train", "eagle3-stop", "--eagle3", str(out), *common, "--epochs", "2", "--draft-vocab", "64",
            "--ranking", str(ranking)]
    assert main(argv) == 0
    copy = tmp_path / "eagle3-vocab64"
    assert f"stop head -> {copy}/stop_head" in capsys.readouterr().out
    drafter, vocab = load_eagle3(copy)
    assert torch.equal(vocab, ranked[:64]) and load_stop_head(copy).hidden_size == meta["hidden_size"]
    for name, tensor in load_eagle3(out)[0].state_dict().items():
        assert torch.equal(tensor, drafter.state_dict()[name]), name
    written = (copy / "config.json").stat().st_mtime_ns
    assert main(argv) == 0 and (copy / "config.json").stat().st_mtime_ns == written  # a fresh copy is kept
