"""Training the micro-step drafter by self-distillation from a frozen base model (pure torch, no engine).

Data: the Medusa corpus route (medusa/distill_data.py) with ``feature_layers``: one cached base pass gives,
per token position t, the features f_t [F, H] and the final normed hidden state h_t. A training example is
a trained position t whose next T = max_micro_steps tokens lie in its chunk:

    drafter input    features f_t, tokens x_{t+1} .. x_{t+T} (teacher forcing on the corpus tokens)
    target j         the base's next-token distribution at t+1+j, p = softmax(lm_head(h_{t+1+j})),
                     recomputed every step through the frozen LM head (exact; the corpus is sampled at
                     temperature 0.7, not the base's greedy output, so the target is the distribution)
    loss             KL(p || q_j) averaged over micro-steps and positions (= cross-entropy minus the
                     base's entropy: same gradient)
                     + stop_weight * BCE(p_continue_j, label_j), label_j = the drafter's argmax equals the
                     base's argmax at micro-steps 0..j (this one accepted and every earlier one).
                     The BCE counts micro-step j only where the fed tokens x_{t+2} .. x_{t+1+j} are the
                     base's own argmax: at inference the drafter is only asked after accepted drafts,
                     which are the base's argmax; after a sampled deviation the label is undefined.

Batches, the held-out split, the learning-rate schedule and the checkpoint mechanics are Medusa's
(medusa/train.py): a step's batch depends only on (seed, step) and a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.medusa.distill_data import BasePass
from afterburner.spec_decode.medusa.train import (
    WINDOW,
    Checkpoint,
    TrainError,
    _SoftKL,
    optimize,
    positions,
    resume_from,
    split_chunks,
    target_logprobs,
    windows,
)

EVAL_BATCH = 128  # positions per evaluation batch


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    steps: int | None = None  # total optimizer steps; overrides epochs
    lr: float = 3e-3
    batch_size: int = 128  # training positions per optimizer step (each with max_micro_steps micro-steps)
    stop_weight: float = 1.0
    seed: int = 0
    holdout: float = 0.05
    save_every: int = 50
    warmup: float = 0.05


@dataclass
class TrainResult:
    drafter: MicroStepDrafter
    step: int
    total_steps: int
    resumed_from: int | None
    train_positions: int
    holdout_positions: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, this run only
    before: dict = field(default_factory=dict)  # evaluate() on the held-out positions, untrained drafter
    after: dict = field(default_factory=dict)


def drafter_config_for(base_config, feature_layers: tuple[int, ...], *, num_layers: int = 1,
                       max_micro_steps: int = 4, base_model: str = "") -> DrafterConfig:
    """A drafter as wide as the base, its decoder layers shaped like the base's (as EAGLE-3's)."""
    heads = base_config.num_attention_heads
    rope = getattr(base_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(base_config, "rope_theta", 10000.0))
    bad = [i for i in feature_layers if not 1 <= i <= base_config.num_hidden_layers - 1]
    if bad:
        raise TrainError(f"--feature-layers {list(bad)}: the base has {base_config.num_hidden_layers} layers, "
                         f"allowed 1..{base_config.num_hidden_layers - 1}")
    return DrafterConfig(
        base_hidden_size=base_config.hidden_size, vocab_size=base_config.vocab_size,
        feature_layers=tuple(feature_layers), hidden_size=base_config.hidden_size, num_layers=num_layers,
        num_heads=heads, num_kv_heads=getattr(base_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(base_config, "head_dim", None) or base_config.hidden_size // heads,
        intermediate_size=base_config.intermediate_size, max_micro_steps=max_micro_steps,
        rms_norm_eps=float(base_config.rms_norm_eps), rope_theta=float(theta), base_model=base_model)


def base_norm_init(model, drafter_config: DrafterConfig) -> dict[str, torch.Tensor]:
    """Drafter norms that start as the base's own (a Llama-like HF model): feature i is hidden_states[i],
    the input of base layer i, so its norm starts as that layer's input_layernorm (which knows the
    residual stream's outlier channels); the token embedding's as layer 0's; the final norm, which feeds
    the same LM head, as the base's final norm (when the drafter is as wide as the base)."""
    layers = model.base_model.layers
    init = {f"feature_norms.{k}.weight": layers[i].input_layernorm.weight for k, i in
            enumerate(drafter_config.feature_layers)}
    init["embed_norm.weight"] = layers[0].input_layernorm.weight
    if drafter_config.hidden_size == drafter_config.base_hidden_size:
        init["norm.weight"] = model.base_model.norm.weight
    return {name: weight.detach().float().clone() for name, weight in init.items()}


def residual_init(drafter_config: DrafterConfig, init: dict[str, torch.Tensor], *, seed: int = 0,
                  scale: float = 0.1) -> dict[str, torch.Tensor]:
    """``init`` plus a start at the logit lens of the last feature layer (as Medusa heads start at the
    identity on the final hidden state): fc_in copies the last feature (its norm plain, weights 1) and
    mixes in the rest at ``scale`` x the default init, the decoder layers' output projections start at 0
    (each layer the identity), so at step 0 the drafter's logits are the LM head on the base's residual
    stream at that layer, position t. Needs the drafter as wide as the base."""
    c = drafter_config
    if c.hidden_size != c.base_hidden_size:
        raise TrainError("residual init needs a drafter as wide as the base (hidden_size == base_hidden_size)")
    inputs = (len(c.feature_layers) + 1) * c.base_hidden_size
    g = torch.Generator().manual_seed(seed)
    fc_in = torch.randn(c.hidden_size, inputs, generator=g) * (scale / inputs ** 0.5)
    last = (len(c.feature_layers) - 1) * c.base_hidden_size
    fc_in[:, last:last + c.base_hidden_size] += torch.eye(c.hidden_size)
    out = {**init, "fc_in.weight": fc_in,
           f"feature_norms.{len(c.feature_layers) - 1}.weight": torch.ones(c.hidden_size)}
    for i in range(c.num_layers):
        out[f"layers.{i}.o_proj.weight"] = torch.zeros(c.hidden_size, c.num_heads * c.head_dim)
        out[f"layers.{i}.down_proj.weight"] = torch.zeros(c.hidden_size, c.intermediate_size)
    return out


def micro_step_loss(drafter: MicroStepDrafter, base: BasePass, pos: torch.Tensor, lm_head: torch.Tensor,
                    softcap: float | None = None) -> dict[str, torch.Tensor]:
    """Losses and per-micro-step outcomes at positions ``pos`` [P]: kl [T] (mean over P), bce (scalar),
    agree [P, T] (drafter argmax == base argmax), label [P, T], valid [P, T], p_continue [P, T]."""
    steps = drafter.config.max_micro_steps
    with torch.no_grad():
        target = target_logprobs(base.hidden, pos, lm_head, steps, softcap)  # [T, P, V]: base at t+1+j
    tokens = base.tokens[pos[:, None] + 1 + torch.arange(steps)]  # [P, T]: x_{t+1+j}
    logits, p_continue = drafter(base.features[pos], tokens)  # [P, T, V], [P, T]
    kl = _SoftKL.apply(logits.transpose(0, 1), target).mean(-1)  # [T]
    base_top = target.argmax(-1).T  # [P, T]
    agree = logits.detach().argmax(-1) == base_top
    label = agree.long().cumprod(1).bool()
    greedy_prefix = torch.cat([torch.ones_like(agree[:, :1]), tokens[:, 1:] == base_top[:, :-1]], 1)
    valid = greedy_prefix.long().cumprod(1).bool()  # fed x_{t+2} .. x_{t+1+j} are the base's argmax
    bce = (F.binary_cross_entropy(p_continue[valid].clamp(1e-6, 1 - 1e-6), label[valid].float())
           if valid.any() else p_continue.sum() * 0)
    return {"kl": kl, "bce": bce, "agree": agree, "label": label, "valid": valid, "p_continue": p_continue}


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney U; ties by average rank); None with one class only."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    unique, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct score's first occurrence
    ranks = (first + (counts + 1) / 2)[inverse]  # average 1-based rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@torch.no_grad()
def evaluate(drafter: MicroStepDrafter, base: BasePass, pos: torch.Tensor, lm_head: torch.Tensor,
             softcap: float | None = None) -> dict:
    """Held-out numbers: per-micro-step KL and top-1 agreement with the base (teacher-forced); mean run
    of agreeing micro-steps from the first (an accepted-length proxy); the stop head's BCE, accuracy at
    0.5 and ROC AUC for its label, and the label's positive rate, on the micro-steps where the label is
    defined."""
    kls, agree, labels, scores, bces = [], [], [], [], []
    for i in range(0, len(pos), EVAL_BATCH):
        part = pos[i:i + EVAL_BATCH]
        out = micro_step_loss(drafter, base, part, lm_head, softcap)
        kls.append(out["kl"] * len(part))
        agree.append(out["agree"])
        labels.append(out["label"][out["valid"]])
        scores.append(out["p_continue"][out["valid"]])
        bces.append(out["bce"] * int(out["valid"].sum()))
    agree_all, label_all, score_all = torch.cat(agree).float(), torch.cat(labels), torch.cat(scores)
    return {"kl": (torch.stack(kls).sum(0) / max(len(pos), 1)).tolist(),
            "top1": agree_all.mean(0).tolist(),
            "accepted": float(agree_all.cumprod(1).sum(1).mean()),
            "stop_bce": float(sum(bces) / max(len(label_all), 1)),
            "stop_accuracy": float(((score_all >= 0.5) == label_all).float().mean()),
            "stop_label_rate": float(label_all.float().mean()),
            "stop_auc": roc_auc(score_all, label_all),
            "positions": len(pos)}


def train_drafter(base: BasePass, embed: torch.Tensor, lm_head: torch.Tensor, *, drafter_config: DrafterConfig,
                  config: TrainConfig, work_dir: str | Path, resume: bool = False, softcap: float | None = None,
                  init: dict[str, torch.Tensor] | None = None, progress: bool = True,
                  stop_after: int | None = None) -> TrainResult:
    """Train a drafter on ``base`` (a pass with features at drafter_config.feature_layers); checkpoints go to
    ``work_dir/checkpoint.pt``; ``resume`` continues from it. ``init``: drafter weights to start from
    (``base_norm_init``). ``stop_after``: leave after that many steps without a final save (a
    kill, for tests)."""
    started = time.time()
    if base.features is None or base.features.shape[1] != len(drafter_config.feature_layers):
        raise TrainError("the base pass has no features at the drafter's feature layers (build it with "
                         "feature_layers)")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    lm_head, steps_ahead = lm_head.detach().float(), drafter_config.max_micro_steps
    train_chunks, held_chunks = split_chunks(base, num_heads=steps_ahead, holdout=config.holdout, seed=config.seed)
    wins = windows(base, train_chunks, steps_ahead)
    if len(wins) == 0:
        raise TrainError(f"no training positions: no chunk is longer than max_micro_steps={steps_ahead} "
                         "(chat data trains on assistant turns only)")
    per_step = max(1, config.batch_size // WINDOW)
    total = config.steps or max(1, round(config.epochs * math.ceil(len(wins) / per_step)))
    held_pos = positions(base, held_chunks, steps_ahead)

    torch.manual_seed(config.seed)
    drafter = MicroStepDrafter(drafter_config).attach_base(embed, lm_head)
    if init:
        drafter.load_state_dict(init, strict=False)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.lr, weight_decay=0.0, foreach=True)
    identity = {"config": {**asdict(config), "save_every": None}, "drafter": drafter_config.to_dict(),
                "key": base.key, "init": sorted(init or {})}
    step, before, earlier = (resume_from(ckpt_path, identity, drafter, optimizer, key="drafter")
                              if resume else (0, None, 0.0))
    resumed_from = step or None
    if before is None:
        before = evaluate(drafter, base, held_pos, lm_head, softcap) if len(held_pos) else {}

    def step_loss(pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, str]]:
        out = micro_step_loss(drafter, base, pos, lm_head, softcap)
        top1 = "/".join(f"{a:.2f}" for a in out["agree"].float().mean(0).tolist())
        fields = {"kl": f"{out['kl'].mean().item():.3f}", "bce": f"{out['bce'].item():.3f}", "top1": top1}
        return out["kl"].mean() + config.stop_weight * out["bce"], fields

    drafter.train()
    checkpoint = Checkpoint(ckpt_path, identity, "drafter", before, earlier, started)
    step, losses = optimize(drafter, optimizer, step_loss, wins=wins, per_step=per_step, total=total, step=step,
                            config=config, checkpoint=checkpoint,
                            desc="hamburger drafter", progress=progress, stop_after=stop_after)
    drafter.eval()
    after = evaluate(drafter, base, held_pos, lm_head, softcap) if len(held_pos) and step == total else {}
    return TrainResult(drafter, step, total, resumed_from, int(wins[:, 1].sum()), len(held_pos),
                       checkpoint.seconds, losses, before, after)
