"""Micro-step drafters for tests: small random ones, and test doubles that draft what the base would."""

from __future__ import annotations

import torch

from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.hamburger.reference import base_forward


def small_config(**overrides) -> DrafterConfig:
    """A drafter narrower than its (imaginary) base, so fc_out is a real projection; 2 layers, GQA."""
    fields = dict(base_hidden_size=32, vocab_size=50, feature_layers=(1, 3), hidden_size=24, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, max_micro_steps=4,
                  rms_norm_eps=1e-6, rope_theta=10000.0, stop_threshold=0.8, base_model="none")
    return DrafterConfig(**{**fields, **overrides})


def random_drafter(config: DrafterConfig, seed: int = 0, stop_std: float = 1.0) -> MicroStepDrafter:
    """Random weights and base embedding/LM head; ``stop_std`` spreads P(continue) across inputs."""
    torch.manual_seed(seed)
    drafter = MicroStepDrafter(config)
    with torch.no_grad():
        for p in drafter.stop_head.parameters():
            p.normal_(0, stop_std)
    embed = torch.randn(config.vocab_size, config.base_hidden_size)
    return drafter.attach_base(embed, torch.randn(config.vocab_size, config.base_hidden_size)).eval()


def tiny_drafter(model, feature_layers: tuple[int, ...] = (1,), seed: int = 0) -> MicroStepDrafter:
    """A random drafter over a Hugging Face model's embedding and LM head."""
    c = model.config
    config = DrafterConfig(base_hidden_size=c.hidden_size, vocab_size=c.vocab_size, feature_layers=feature_layers,
                           hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                           intermediate_size=128)
    torch.manual_seed(seed)
    return MicroStepDrafter(config).attach_base(model.get_input_embeddings().weight,
                                                model.get_output_embeddings().weight).eval()


def lens_drafter(model_dir) -> MicroStepDrafter:
    """A drafter that is the logit lens of a Llama's layer-1 features (``residual_init``): untrained, yet some
    of its drafts are accepted (where the random tiny model repeats itself)."""
    from afterburner.spec_decode.hamburger.train import base_norm_init, drafter_config_for, residual_init
    from afterburner.spec_decode.medusa.distill_data import load_base

    base, _ = load_base(model_dir)
    config = drafter_config_for(base.config, (1,), max_micro_steps=4, base_model=str(model_dir))
    model = MicroStepDrafter(config)
    model.load_state_dict(residual_init(config, base_norm_init(base, config)), strict=False)
    return model


class OracleDrafter(MicroStepDrafter):
    """Drafts the base's greedy continuation of a known sequence, with every ``wrong_at``-th draft
    (1-based) replaced by another token: the base accepts exactly ``wrong_at - 1`` drafts per step.

    It finds where it is by matching the features against those of the whole greedy sequence ``ids``
    (nearest position), so it needs nothing but what ``draft`` is given."""

    def __init__(self, model, ids: torch.Tensor, *, feature_layers: tuple[int, ...] = (1,), wrong_at: int = 3):
        base = tiny_drafter(model, feature_layers)
        super().__init__(base.config)
        self.ids, self.wrong_at = ids, wrong_at
        with torch.no_grad():
            self.features = base_forward(model, ids, feature_layers)[1]  # [T, F, H]

    @torch.no_grad()
    def draft(self, features, last_tokens, *, max_tokens, stop_threshold, min_tokens=0):
        rows = []
        for row in features:
            t = int(((self.features - row) ** 2).flatten(1).sum(1).argmin())  # the position of these features
            drafts = self.ids[t + 2:t + 2 + max_tokens].tolist()
            if len(drafts) >= self.wrong_at:
                drafts[self.wrong_at - 1] = (drafts[self.wrong_at - 1] + 1) % self.config.vocab_size
            rows.append(drafts)
        return rows


class TreeOracleDrafter(OracleDrafter):
    """For a token tree: at the first micro-step the base's greedy token is the second best (the greedy
    chain is wrong there), deeper ones are best. A tree with the path (1, 0) accepts 2 drafts a step, a
    chain none; only features taken at the accepted path's last node keep it on track."""

    @torch.no_grad()
    def draft_topk(self, features, last_tokens, *, depth, topk):
        out = []
        for row in features:
            t = int(((self.features - row) ** 2).flatten(1).sum(1).argmin())
            truth = self.ids[t + 2:t + 2 + depth].tolist()
            truth += [0] * (depth - len(truth))
            ranks = [[(x + 1 + i) % self.config.vocab_size for i in range(topk)] for x in truth]
            for j, x in enumerate(truth):
                ranks[j][1 if j == 0 else 0] = x
            out.append(ranks)
        return torch.tensor(out)


class FixedDrafter(MicroStepDrafter):
    """Always drafts the same tokens."""

    def __init__(self, config: DrafterConfig, tokens: list[int]):
        super().__init__(config)
        self.tokens = tokens

    def draft(self, features, last_tokens, *, max_tokens, stop_threshold, min_tokens=0):
        return [list(self.tokens[:max_tokens]) for _ in range(features.shape[0])]
