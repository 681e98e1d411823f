"""Training Medusa heads by self-distillation from a frozen base model (pure torch, no engine).

Head k (1..K) at position t reads h_t and learns the base model's own next-token distribution at position
t+k, p_{t+k} = softmax(lm_head(h_{t+k})), i.e. its prediction of token t+k+1. Loss: KL(p_{t+k} || q_k(h_t))
averaged over positions and heads (each head has its own parameters and Adam is per parameter, so head
weights such as the paper's 0.8^k barely change anything here).

Targets are recomputed every step from cached hidden states through the frozen lm_head rather than stored:
storing a top-k distribution would be approximate and a full one is V floats per token (~200 KB for
SmolLM2), while recomputing costs one [positions, V] matmul per step, shared by the K heads because a batch
is made of windows of consecutive positions: about 1/(2K) of the heads' own matmuls (forward and backward,
2K [positions, V] matmuls with a shared lm_head).

A step's batch depends only on (seed, step), and checkpoints hold heads, optimizer, step and RNG, so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from afterburner.spec_decode.medusa.distill_data import BasePass, progress_bar
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads
from afterburner.spec_decode.tree_plan import Acceptance, candidate_ranks

WINDOW = 32  # consecutive start positions per batch window: neighbours share their target positions
EVAL_BATCH = 256  # positions per evaluation batch: the memory of a training step


class TrainError(ValueError):
    """Training cannot start or resume; the message is one line."""


@dataclass(frozen=True)
class TrainConfig:
    num_heads: int = 3
    num_layers: int = 1
    shared_lm_head: bool = True
    epochs: float = 1.0
    # SmolLM2, half an epoch, held-out top-1 per head: 0.36/0.25/0.22 at 3e-3,
    # 0.31/0.21/0.20 at 1e-3, 0.32/0.22/0.19 at 1e-2
    lr: float = 3e-3
    batch_size: int = 256  # training positions per optimizer step
    seed: int = 0
    holdout: float = 0.05  # share of positions (whole chunks) kept out for the agreement numbers
    save_every: int = 50  # optimizer steps between checkpoints
    warmup: float = 0.05  # share of steps with a linear learning-rate ramp; cosine decay to 10% after


@dataclass
class TrainResult:
    heads: MedusaHeads
    step: int
    total_steps: int
    resumed_from: int | None
    train_positions: int
    holdout_positions: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, this run only
    before: dict = field(default_factory=dict)  # evaluate() on the held-out slice, untrained heads
    after: dict = field(default_factory=dict)


def chunk_positions(base: BasePass, chunk: int, num_heads: int) -> torch.Tensor:
    """Global positions t of one chunk that are marked trained and whose targets t+1..t+K lie in it."""
    start, usable = int(base.chunk_starts[chunk]), int(base.chunk_lengths[chunk]) - num_heads
    if usable <= 0:
        return torch.zeros(0, dtype=torch.long)
    return start + torch.nonzero(base.trained[start:start + usable]).flatten()


def split_chunks(base: BasePass, *, num_heads: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) chunk ids: whole chunks, drawn in a seeded order, ~``holdout`` of the positions."""
    counts = {c: len(chunk_positions(base, c, num_heads)) for c in range(len(base.chunk_lengths))}
    usable = [c for c, n in counts.items() if n > 0]
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(counts[c] for c in usable)
    held, count = [], 0
    for i in order:
        if len(usable) - len(held) <= 1 or count >= holdout * total:
            break
        held.append(usable[i])
        count += counts[usable[i]]
    return sorted(set(usable) - set(held)), sorted(held)


def positions(base: BasePass, chunks: list[int], num_heads: int) -> torch.Tensor:
    """[P] int64: the training positions of ``chunks``."""
    parts = [chunk_positions(base, c, num_heads) for c in chunks]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def windows(base: BasePass, chunks: list[int], num_heads: int) -> torch.Tensor:
    """[W, 2] (first position, count): runs of consecutive training positions, cut to at most WINDOW."""
    rows = []
    for c in chunks:
        pos = chunk_positions(base, c, num_heads)
        breaks = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
        for run in torch.tensor_split(pos, breaks):
            rows += [(int(run[i]), min(WINDOW, len(run) - i)) for i in range(0, len(run), WINDOW)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def batch_positions(wins: torch.Tensor, step: int, *, per_step: int, seed: int) -> torch.Tensor:
    """Positions of optimizer step ``step``: a function of (seed, step) only, so resumes replay it."""
    steps_per_epoch = math.ceil(len(wins) / per_step)
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    chosen = wins[order[index * per_step:(index + 1) * per_step]]
    return torch.cat([torch.arange(s, s + n) for s, n in chosen.tolist()])


def target_logprobs(hidden: torch.Tensor, pos: torch.Tensor, lm_head: torch.Tensor, num_heads: int,
                    softcap: float | None) -> torch.Tensor:
    """[K, P, V] log p_{t+k}: the base model's log-distribution at t+k for each position t in ``pos``."""
    needed = pos[None, :] + torch.arange(1, num_heads + 1)[:, None]  # [K, P]
    unique, inverse = torch.unique(needed, return_inverse=True)
    logits = hidden[unique] @ lm_head.T  # [U, V], U ~ P + K for windows of consecutive positions
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, dim=-1)[inverse]


class _SoftKL(torch.autograd.Function):
    """KL(p || softmax(z)) over the last axis, with the gradient softmax(z) - p written out: autograd through
    log_softmax makes several more passes over [K, P, V] (~30% of a CPU step at SmolLM2's vocabulary)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
        head_logp = torch.log_softmax(logits, dim=-1)
        target_p = target_logp.exp()
        ctx.save_for_backward(head_logp, target_p)
        return torch.sub(target_logp, head_logp).mul_(target_p).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        head_logp, target_p = ctx.saved_tensors
        return head_logp.exp().sub_(target_p).mul_(grad[..., None]), None


def distill_kl(heads: MedusaHeads, hidden: torch.Tensor, pos: torch.Tensor, lm_head: torch.Tensor,
               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL per head [K], head logits [K, P, V] detached, target top-1 [K, P]) for positions ``pos``."""
    with torch.no_grad():
        target = target_logprobs(hidden, pos, lm_head, heads.config.num_heads, softcap)
    head_logits = heads(hidden[pos], lm_head)  # [K, P, V]
    kl = _SoftKL.apply(head_logits, target).mean(-1)
    return kl, head_logits.detach(), target.argmax(-1)


@torch.no_grad()
def evaluate(heads: MedusaHeads, base: BasePass, pos: torch.Tensor, lm_head: torch.Tensor,
             softcap: float | None = None) -> dict:
    """Per-head KL and top-1 agreement with the base model (head k's argmax at t vs the base argmax at
    t+k), the mean run of consecutive agreeing heads from head 1 (a proxy for accepted drafts), and where
    the base's token ranks among each head's candidates: the acceptance a tree is chosen from
    (``tree_plan.Acceptance``)."""
    kls, ranks = [], []
    for i in range(0, len(pos), EVAL_BATCH):
        part = pos[i:i + EVAL_BATCH]
        kl, head_logits, target_top = distill_kl(heads, base.hidden, part, lm_head, softcap)
        kls.append(kl * len(part))
        ranks.append(candidate_ranks(head_logits, target_top))
    all_ranks = torch.cat(ranks)  # [P, K]
    agree_all = (all_ranks == 0).T.float()  # [K, P]
    return {"kl": (torch.stack(kls).sum(0) / max(len(pos), 1)).tolist(),
            "top1": agree_all.mean(1).tolist(),
            "accepted": float(agree_all.cumprod(0).sum(0).mean()),
            "positions": len(pos),
            "tree": Acceptance.from_ranks(all_ranks).to_dict()}


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    warm = max(1, int(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def new_heads(config: TrainConfig, lm_head: torch.Tensor) -> MedusaHeads:
    vocab, hidden = lm_head.shape
    heads = MedusaHeads(HeadsConfig(hidden_size=hidden, vocab_size=vocab, num_heads=config.num_heads,
                                    num_layers=config.num_layers, shared_lm_head=config.shared_lm_head))
    if heads.lm_heads is not None:  # own lm_heads start as the base one (FasterDecoding does the same)
        with torch.no_grad():
            for head in heads.lm_heads:
                head.weight.copy_(lm_head)
    return heads


class _StopRequest:
    """Ctrl-C during training finishes the current step and saves a checkpoint (a step cut in half would
    not resume exactly); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resume_from(ckpt_path: Path, identity: dict, model: torch.nn.Module, optimizer, *,
                key: str) -> tuple[int, dict | None, float]:
    """Restore a checkpoint made with the same ``identity`` (settings and data) into ``model`` (saved under
    ``key``), the optimizer and torch's RNG: (its step, its before-training evaluation, the seconds its
    runs trained so far); (0, None, 0.0) when there is none. Another identity is a ``TrainError``: a
    resumed run must end as an uninterrupted one."""
    if not ckpt_path.is_file():
        return 0, None, 0.0
    state = torch.load(ckpt_path, weights_only=False)
    if state["identity"] != identity:
        raise TrainError(f"{ckpt_path} was made with other settings or data; drop --resume (or delete "
                         "it) to start over")
    model.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["before"], float(state.get("seconds", 0.0))


@dataclass(frozen=True)
class Checkpoint:
    """Where and as what a training run saves itself (read back by ``resume_from``)."""

    path: Path
    identity: dict  # the settings and data: a resume must match them
    key: str  # the model's state dict is saved under this name
    before: dict  # the evaluation before training, kept for the final report
    earlier: float = 0.0  # seconds earlier runs of this training took (resume_from)
    started: float = field(default_factory=time.time)  # when this run started

    @property
    def seconds(self) -> float:
        """Seconds this training has taken over all its runs (a resume of a finished run adds only its own)."""
        return self.earlier + time.time() - self.started

    def save(self, model: torch.nn.Module, optimizer, step: int) -> None:
        _save(self.path, {"identity": self.identity, self.key: model.state_dict(), "step": step,
                          "before": self.before, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                          "seconds": self.seconds})


def optimize(model: torch.nn.Module, optimizer, step_loss, *, wins: torch.Tensor, per_step: int, total: int,
             step: int, config, checkpoint: Checkpoint, desc: str, progress: bool,
             stop_after: int | None) -> tuple[int, list[float]]:
    """The self-distillation loop every drafter trains with: from ``step`` to ``total`` (or ``stop_after``
    steps), each on the batch of (seed, step) at the schedule's learning rate, ``step_loss(positions) ->
    (loss, progress-bar fields)``; a checkpoint every ``save_every`` steps, at the end and on Ctrl-C (then
    ``KeyboardInterrupt`` saying how to resume). Returns (the step reached, this run's losses)."""
    losses, stop = [], _StopRequest()
    bar = progress_bar(total=total, initial=step, unit="step", desc=desc, disable=not progress)
    with stop:
        while step < total and (stop_after is None or len(losses) < stop_after):
            pos = batch_positions(wins, step, per_step=per_step, seed=config.seed)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, config)
            loss, fields = step_loss(pos)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(**fields, refresh=False)
            bar.update(1)
            if step % config.save_every == 0 or step == total or stop.requested:
                checkpoint.save(model, optimizer, step)
            if stop.requested:
                bar.close()
                raise KeyboardInterrupt(f"interrupted at step {step}/{total}; checkpoint saved, "
                                        "--resume continues")
    bar.close()
    return step, losses


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def train_heads(base: BasePass, lm_head: torch.Tensor, *, config: TrainConfig, work_dir: str | Path,
                resume: bool = False, softcap: float | None = None, progress: bool = True,
                stop_after: int | None = None) -> TrainResult:
    """Train heads on ``base``; checkpoints go to ``work_dir/checkpoint.pt``. ``resume`` continues from it
    (when present). ``stop_after``: leave after that many steps without a final save (a kill, for tests)."""
    started = time.time()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    lm_head = lm_head.detach().float()
    train_chunks, held_chunks = split_chunks(base, num_heads=config.num_heads, holdout=config.holdout,
                                             seed=config.seed)
    wins = windows(base, train_chunks, config.num_heads)
    if len(wins) == 0:
        raise TrainError(f"no training positions: no chunk is longer than num_heads={config.num_heads} "
                         "(chat data trains on assistant turns only)")
    per_step = max(1, config.batch_size // WINDOW)
    total = max(1, round(config.epochs * math.ceil(len(wins) / per_step)))
    held_pos = positions(base, held_chunks, config.num_heads)
    num_train = int(wins[:, 1].sum())

    torch.manual_seed(config.seed)
    heads = new_heads(config, lm_head)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0, foreach=True)
    identity = {"config": {**asdict(config), "save_every": None}, "key": base.key}
    step, before, earlier = (resume_from(ckpt_path, identity, heads, optimizer, key="heads")
                              if resume else (0, None, 0.0))
    resumed_from = step or None
    if before is None:
        before = evaluate(heads, base, held_pos, lm_head, softcap) if len(held_pos) else {}

    def step_loss(pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, str]]:
        kl, head_logits, target_top = distill_kl(heads, base.hidden, pos, lm_head, softcap)
        top1 = "/".join(f"{a:.2f}" for a in (head_logits.argmax(-1) == target_top).float().mean(1).tolist())
        return kl.mean(), {"kl": f"{kl.mean().item():.3f}", "top1": top1}

    checkpoint = Checkpoint(ckpt_path, identity, "heads", before, earlier, started)
    step, losses = optimize(heads, optimizer, step_loss, wins=wins, per_step=per_step, total=total, step=step,
                            config=config, checkpoint=checkpoint,
                            desc="medusa heads", progress=progress, stop_after=stop_after)
    after = evaluate(heads, base, held_pos, lm_head, softcap) if len(held_pos) and step == total else {}
    return TrainResult(heads, step, total, resumed_from, num_train, len(held_pos), checkpoint.seconds,
                       losses, before, after)
