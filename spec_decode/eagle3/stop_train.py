"""Fitting a stop head (``spec_decode/stop_head.py``) on a frozen EAGLE-3 drafter: vLLM's own EAGLE-3 then
drafts with the same weights as at a fixed ``k``, and the head chooses each request's draft length per step.

Examples come from the drafter's teacher-forced unroll over the cached base pass (``Eagle3Drafter.
unroll_states``, as in training): at slot t, draft step m reads the normed step state and the draft
distribution over the drafting vocabulary; its label is the micro-step drafter's (``hamburger/train.py``):
the drafter's argmax equals the base's at steps 1..m (this draft and every earlier one accepted), counted
only where the fed tokens x_{t+2} .. x_{t+m} are the base's own argmax (at inference a draft step is only
asked after accepted drafts). The drafter is frozen, so its outputs are computed once and the head trains
on them for a few epochs (seconds). The held-out chunks are the drafter's own (same seed and share), and
the held-out numbers compare the head's ranking with the draft probability's, the confidence stop's signal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.hamburger.train import roc_auc
from afterburner.spec_decode.medusa.distill_data import BasePass
from afterburner.spec_decode.medusa.train import TrainError, chunk_positions, split_chunks, target_logprobs
from afterburner.spec_decode.stop_head import StopHead, confidence_features


@dataclass(frozen=True)
class StopTrainConfig:
    epochs: int = 10  # held out (SmolLM2, 42k drafts): BCE 0.32 at 4-12 epochs, 0.41 at 30 (it overfits)
    lr: float = 2e-3
    batch_size: int = 512
    seed: int = 0
    holdout: float = 0.05  # the drafter's own held-out share and seed keep its held-out chunks unseen


@dataclass
class StopExamples:
    """One row per (slot, draft step) where the label is defined."""
    states: torch.Tensor  # [N, H] normed draft-step states
    confidence: torch.Tensor  # [N, 2] top log-probability and entropy over the drafting vocabulary
    labels: torch.Tensor  # [N] bool: accepted, with every earlier draft of the chain
    steps: torch.Tensor  # [N] draft step (0-based)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class StopTrainResult:
    head: StopHead
    train_examples: int
    holdout_examples: int
    seconds: float
    holdout: dict = field(default_factory=dict)


@torch.no_grad()
def collect(drafter: Eagle3Drafter, base: BasePass, chunks: list[int], lm_head: torch.Tensor, *,
            vocab_ids: torch.Tensor | None = None, softcap: float | None = None) -> StopExamples:
    """The stop head's examples over ``chunks``; ``vocab_ids``: the drafter drafts from these tokens only
    (its folder's d2t), so its argmax and confidence are over them."""
    steps = drafter.config.max_micro_steps
    parts: dict[str, list[torch.Tensor]] = {"states": [], "confidence": [], "labels": [], "steps": []}
    for chunk in chunks:
        pos = chunk_positions(base, chunk, steps)
        if len(pos) == 0:
            continue
        start = int(base.chunk_starts[chunk])
        t, slots = int(base.chunk_lengths[chunk]) - steps, pos - start
        pre = drafter.unroll_states(base.features[start:start + t][None],
                                    base.tokens[start + 1:start + t + steps][None], steps)[:, 0, slots]
        states = drafter.norm(pre)  # [steps, S, H]: what vLLM's EAGLE-3 hands its sampler
        logits = states @ drafter.lm_head_weight.T
        if vocab_ids is not None:
            logits = logits[..., vocab_ids]
        drafted = logits.argmax(-1) if vocab_ids is None else vocab_ids[logits.argmax(-1)]
        base_top = target_logprobs(base.hidden, pos, lm_head, steps, softcap).argmax(-1)  # [steps, S]
        tokens = base.tokens[pos[:, None] + 1 + torch.arange(steps)]  # [S, steps]: x_{t+1+m}, fed at step m
        label = (drafted == base_top).T.long().cumprod(1).bool()  # [S, steps]
        fed_greedy = torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool),
                                tokens[:, 1:] == base_top.T[:, :-1]], 1)
        valid = fed_greedy.long().cumprod(1).bool()
        parts["states"].append(states.transpose(0, 1)[valid])
        parts["confidence"].append(confidence_features(logits).transpose(0, 1)[valid])
        parts["labels"].append(label[valid])
        parts["steps"].append(torch.arange(steps).expand_as(valid)[valid])
    if not parts["labels"]:
        return StopExamples(torch.zeros(0, drafter.config.hidden_size), torch.zeros(0, 2),
                            torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    return StopExamples(*(torch.cat(parts[name]) for name in ("states", "confidence", "labels", "steps")))


def scores(head: StopHead, examples: StopExamples) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(head(torch.cat([examples.states, examples.confidence], -1)).squeeze(-1))


def evaluate(head: StopHead, examples: StopExamples) -> dict:
    """Held-out: the head's ROC AUC for its label against the draft probability's (the confidence stop),
    overall and per draft step; the label's positive rate; examples per step."""
    if len(examples) == 0:
        return {}
    p = scores(head, examples)
    probability = examples.confidence[:, 0].exp()
    def numbers(at: torch.Tensor) -> dict:
        labels = examples.labels[at]
        return {"examples": int(at.sum()), "label_rate": float(labels.float().mean()),
                "head_auc": roc_auc(p[at], labels), "confidence_auc": roc_auc(probability[at], labels)}

    every = torch.ones_like(examples.labels)
    return {**numbers(every),
            "head_bce": float(F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), examples.labels.float())),
            "per_step": {int(m) + 1: numbers(examples.steps == m) for m in examples.steps.unique()}}


def train_stop_head(drafter: Eagle3Drafter, base: BasePass, lm_head: torch.Tensor, *, config: StopTrainConfig,
                    vocab_ids: torch.Tensor | None = None, softcap: float | None = None,
                    progress: bool = True) -> StopTrainResult:
    """Fit a stop head on ``drafter`` (attached to its base, frozen) over ``base``'s training chunks."""
    started = time.time()
    steps = drafter.config.max_micro_steps
    if base.features is None or base.features.shape[1] != len(drafter.config.feature_layers):
        raise TrainError("the base pass has no features at the drafter's feature layers")
    train_chunks, held_chunks = split_chunks(base, num_heads=steps, holdout=config.holdout, seed=config.seed)
    lm_head = lm_head.detach().float()
    drafter.eval()
    if progress:
        print(f"[afterburner] stop head: the drafter's outputs over {len(train_chunks)} + {len(held_chunks)} "
              "chunks", flush=True)
    train = collect(drafter, base, train_chunks, lm_head, vocab_ids=vocab_ids, softcap=softcap)
    held = collect(drafter, base, held_chunks, lm_head, vocab_ids=vocab_ids, softcap=softcap)
    if len(train) == 0 or bool(train.labels.all()) or not bool(train.labels.any()):
        raise TrainError(f"the stop head needs accepted and rejected drafts; got {int(train.labels.sum())} "
                         f"accepted of {len(train)}")
    generator = torch.Generator().manual_seed(config.seed)
    head = StopHead(drafter.config.hidden_size).reset(generator)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    inputs, labels = torch.cat([train.states, train.confidence], -1), train.labels.float()
    for epoch in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            batch = order[i:i + config.batch_size]
            loss = F.binary_cross_entropy_with_logits(head(inputs[batch]).squeeze(-1), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if progress and (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1}/{config.epochs}: train BCE {total / len(labels):.4f}", flush=True)
    head.eval()
    return StopTrainResult(head, len(train), len(held), time.time() - started, evaluate(head, held))
