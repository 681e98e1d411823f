"""Training a ``TinyLlama`` from scratch on the synthetic tasks, resumable.

Everything a step uses is a function of (seed, step): its task (the tasks in turn), its size (MQAR pairs or
regression points, drawn from the configured range) and its batch come from a generator seeded with
(seed, step), and the learning rate (linear warm-up, cosine decay to 10%) from the step. So a run resumed
from a checkpoint sees the same batches and rates as one that never stopped, and the softmax and LLA
models see the same data. The checkpoint (one file, replaced atomically) holds the model, AdamW's state,
the step, the losses and both configurations; resuming with a different configuration is refused.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from afterburner.attention_backends.local_linear.model import LlamaShape, TinyLlama
from afterburner.attention_backends.local_linear.tasks import IGNORE, Batch, make_batch

TASKS = ("mqar", "regression")


class CheckpointMismatch(RuntimeError):
    """--resume found a checkpoint written with another model shape or training configuration."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    tasks: tuple[str, ...] = TASKS
    mqar_pairs: tuple[int, int] = (4, 16)  # per step, uniform in [lo, hi]
    regression_points: tuple[int, int] = (8, 24)
    seed: int = 0
    save_every: int = 100

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0  # training time over all sessions
    resumed_from: int | None = None


def step_batch(config: TrainConfig, step: int) -> tuple[str, Batch]:
    """The task and batch of ``step``: a pure function of (config.seed, step)."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    task = config.tasks[step % len(config.tasks)]
    lo, hi = config.mqar_pairs if task == "mqar" else config.regression_points
    size = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    return task, make_batch(task, batch=config.batch_size, size=size, generator=gen)


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def loss_on(model: TinyLlama, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the scored positions."""
    logits = model(batch.tokens)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def make_optimizer(model: TinyLlama, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and on log lambda (decay would pull lambda towards 1)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))


def save_checkpoint(path: Path, model: TinyLlama, optimizer, config: TrainConfig, state: TrainState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "losses": state.losses, "seconds": state.seconds, "shape": asdict(model.shape),
                "config": asdict(config)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: TinyLlama, optimizer, config: TrainConfig) -> TrainState:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    for name, ours in (("shape", asdict(model.shape)), ("config", asdict(config))):
        theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in saved[name].items()}
        ours = {k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()}
        if name == "config":  # another save interval may continue a run (more steps would change the rates)
            theirs.pop("save_every"), ours.pop("save_every")
        if theirs != ours:
            diff = {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours.get(k)}
            raise CheckpointMismatch(f"{path} was written with another {name} (saved, now): {diff}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(step=saved["step"], losses=list(saved["losses"]), seconds=saved["seconds"],
                      resumed_from=saved["step"])


def train(shape: LlamaShape, config: TrainConfig, *, checkpoint: Path | None = None, resume: bool = False,
          on_step: Callable[[int, float], None] | None = None,
          stop_at: int | None = None) -> tuple[TinyLlama, TrainState]:
    """Train from scratch (or from ``checkpoint`` when ``resume`` and it exists) to ``config.steps``, or
    only to ``stop_at`` of that schedule (a partial run that ``resume`` can continue);
    ``on_step(step, loss)`` after each step (progress). Checkpoints every ``save_every`` steps, at the end,
    and when interrupted (then re-raises)."""
    torch.manual_seed(config.seed)
    model = TinyLlama(shape)
    optimizer = make_optimizer(model, config)
    state = TrainState()
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, optimizer, config)
    model.train()
    started = time.perf_counter()

    def save():
        state.seconds += time.perf_counter() - started
        save_checkpoint(checkpoint, model, optimizer, config, state)
        return time.perf_counter()

    try:
        last = config.steps if stop_at is None else min(stop_at, config.steps)
        while state.step < last:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, state.step)
            _, batch = step_batch(config, state.step)
            loss = loss_on(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state.step += 1
            state.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(state.step, state.losses[-1])
            if checkpoint is not None and (state.step % config.save_every == 0 or state.step == last):
                started = save()
    except KeyboardInterrupt:
        if checkpoint is not None:
            save()
        raise
    if checkpoint is None:
        state.seconds += time.perf_counter() - started
    model.eval()
    return model, state
