"""Training the EAGLE-3 drafter by self-distillation from a frozen base (pure torch), with the micro-step
drafter's data and recipe (spec_decode/hamburger/train.py): the same cached base pass (features at the same
layers), the same held-out chunks, learning-rate schedule, checkpoints and resume (medusa/train.py).

A training example is a whole chunk (EAGLE-3 attends over everything before a position): every trained
position t of the chunk whose next ``steps`` tokens lie in it is a slot, unrolled ``steps`` draft steps
(``Eagle3Drafter.unroll``, teacher-forced on the corpus tokens); step m at slot t is scored by
KL(p_{t+m} || q), p_{t+m} the base's next-token distribution at t+m, averaged over steps and slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig
from afterburner.spec_decode.hamburger.train import TrainConfig, TrainResult
from afterburner.spec_decode.medusa.distill_data import BasePass
from afterburner.spec_decode.medusa.train import (
    Checkpoint,
    TrainError,
    _SoftKL,
    chunk_positions,
    optimize,
    positions,
    resume_from,
    split_chunks,
    target_logprobs,
)


def residual_init(drafter_config: DrafterConfig, init: dict[str, torch.Tensor], *, seed: int = 0,
                  scale: float = 0.1, sharpness: float = 3.0, copy_token: bool = True) -> dict[str, torch.Tensor]:
    """The micro-step drafter's ``--residual-init`` in EAGLE-3's shape: fc copies the (normed) last feature
    and mixes in the rest at ``scale`` x the default init, the MLP's output starts at 0, so step 1 starts
    near the LM head on the base's residual stream at that layer (RMSNorm ignores fc's scale). EAGLE-3
    has no path for the current token but attention (its embedding enters only the qkv input), so the
    attention starts as a copy of it (``self_attention_init``) where the micro-step drafter's fc_in adds
    it to the residual stream (``copy_token=False``: o_proj starts at 0 instead, the logit lens alone).
    ``init``: norms to start from (``base_norm_init``)."""
    c = drafter_config
    g = torch.Generator().manual_seed(seed)
    inputs = len(c.feature_layers) * c.hidden_size
    fc = torch.randn(c.hidden_size, inputs, generator=g) * (scale / inputs ** 0.5)
    last = (len(c.feature_layers) - 1) * c.hidden_size
    fc[:, last:] += torch.eye(c.hidden_size)
    out = {f"fc_norm.{k}.weight": init[f"feature_norms.{k}.weight"] for k in range(len(c.feature_layers))}
    out.update({"fc.weight": fc, f"fc_norm.{len(c.feature_layers) - 1}.weight": torch.ones(c.hidden_size),
                "midlayer.input_layernorm.weight": init["embed_norm.weight"],
                "midlayer.mlp.down_proj.weight": torch.zeros(c.hidden_size, c.intermediate_size),
                **self_attention_init(c, g, sharpness)})
    if not copy_token:
        out["midlayer.self_attn.o_proj.weight"] = torch.zeros(c.hidden_size, c.num_heads * c.head_dim)
    if "norm.weight" in init:
        out["norm.weight"] = init["norm.weight"]
    return out


def self_attention_init(c: DrafterConfig, generator: torch.Generator, sharpness: float) -> dict[str, torch.Tensor]:
    """q and k read the same random orthonormal projection of the hidden half of the qkv input (scaled by
    ``sharpness``), so each query scores its own entry highest (RoPE does not rotate a position against
    itself); v reads a projection of the token half and o_proj maps it back: the attention output starts as
    (a kv_heads x head_dim-dimensional projection of) the current token's normed embedding."""
    h, d, kv, group = c.hidden_size, c.head_dim, c.num_kv_heads, c.num_heads // c.num_kv_heads
    reads_hidden = torch.linalg.qr(torch.randn(h, kv * d, generator=generator))[0].T  # [kv*D, H] orthonormal
    reads_token = torch.linalg.qr(torch.randn(h, kv * d, generator=generator))[0].T
    k, v = torch.zeros(kv * d, 2 * h), torch.zeros(kv * d, 2 * h)
    k[:, h:], v[:, :h] = sharpness * reads_hidden, reads_token
    q = k.view(kv, d, 2 * h).repeat_interleave(group, 0).reshape(c.num_heads * d, 2 * h)  # head i reads group i // g
    o = reads_token.view(kv, d, h).repeat_interleave(group, 0).reshape(c.num_heads * d, h).T / group
    return {"midlayer.self_attn.q_proj.weight": q, "midlayer.self_attn.k_proj.weight": k,
            "midlayer.self_attn.v_proj.weight": v, "midlayer.self_attn.o_proj.weight": o.contiguous()}


def chunk_loss(drafter: Eagle3Drafter, base: BasePass, chunk: int, lm_head: torch.Tensor,
               softcap: float | None) -> dict[str, torch.Tensor] | None:
    """kl [steps] (mean over the chunk's slots) and agree [slots, steps] (drafter argmax == base argmax);
    None when the chunk has no slot."""
    steps = drafter.config.max_micro_steps
    pos = chunk_positions(base, chunk, steps)  # trained positions whose next ``steps`` tokens lie in the chunk
    if len(pos) == 0:
        return None
    start = int(base.chunk_starts[chunk])
    t, slots = int(base.chunk_lengths[chunk]) - steps, pos - start
    with torch.no_grad():  # the base's log-distributions at t+1 .. t+steps for every slot t
        target = target_logprobs(base.hidden, pos, lm_head, steps, softcap)  # [steps, S, V]
    out = drafter.unroll(base.features[start:start + t][None], base.tokens[start + 1:start + t + steps][None],
                         steps)[:, 0, slots]  # [steps, S, V]
    return {"kl": _SoftKL.apply(out, target).mean(-1), "agree": (out.detach().argmax(-1) == target.argmax(-1)).T}


@torch.no_grad()
def evaluate(drafter: Eagle3Drafter, base: BasePass, chunks: list[int], lm_head: torch.Tensor,
             softcap: float | None = None) -> dict:
    """Held-out per-step KL and top-1 agreement with the base (teacher-forced), and the mean run of agreeing
    steps from the first (the accepted-length proxy the micro-step drafter reports too)."""
    kls, agree = [], []
    for chunk in chunks:
        out = chunk_loss(drafter, base, chunk, lm_head, softcap)
        if out is not None:
            kls.append(out["kl"] * len(out["agree"]))
            agree.append(out["agree"])
    if not agree:
        return {}
    agree_all = torch.cat(agree).float()
    return {"kl": (torch.stack(kls).sum(0) / len(agree_all)).tolist(), "top1": agree_all.mean(0).tolist(),
            "accepted": float(agree_all.cumprod(1).sum(1).mean()), "positions": len(agree_all)}


def train_eagle3(base: BasePass, embed: torch.Tensor, lm_head: torch.Tensor, *, drafter_config: DrafterConfig,
                 config: TrainConfig, work_dir: str | Path, resume: bool = False, softcap: float | None = None,
                 init: dict[str, torch.Tensor] | None = None, progress: bool = True,
                 stop_after: int | None = None) -> TrainResult:
    """Train on ``base`` (a pass with features at drafter_config.feature_layers); ``config.batch_size`` is
    chunks per step here; checkpoints in ``work_dir/eagle3_checkpoint.pt`` (``resume`` continues it);
    ``stop_after``: leave after that many steps without a final save (a kill, for tests)."""
    started = time.time()
    if base.features is None or base.features.shape[1] != len(drafter_config.feature_layers):
        raise TrainError("the base pass has no features at the drafter's feature layers")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    lm_head, steps_ahead = lm_head.detach().float(), drafter_config.max_micro_steps
    train_chunks, held_chunks = split_chunks(base, num_heads=steps_ahead, holdout=config.holdout, seed=config.seed)
    if not train_chunks:
        raise TrainError(f"no training chunk is longer than the {steps_ahead} unrolled steps")
    starts = base.chunk_starts[train_chunks]
    chunk_of = dict(zip(starts.tolist(), train_chunks, strict=True))
    wins = torch.stack([starts, torch.ones_like(starts)], 1)  # one "window" per chunk: its first position
    per_step = max(1, config.batch_size)
    total = config.steps or max(1, round(config.epochs * math.ceil(len(train_chunks) / per_step)))

    torch.manual_seed(config.seed)
    drafter = Eagle3Drafter(drafter_config).attach_base(embed, lm_head)
    if init:
        drafter.load_state_dict(init, strict=False)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.lr, weight_decay=0.0, foreach=True)
    identity = {"config": {**asdict(config), "save_every": None}, "drafter": drafter_config.to_dict(),
                "key": base.key, "init": sorted(init or {}), "format": "eagle3"}
    ckpt_path = work_dir / "eagle3_checkpoint.pt"
    step, before, earlier = (resume_from(ckpt_path, identity, drafter, optimizer, key="drafter")
                              if resume else (0, None, 0.0))
    resumed_from = step or None
    if before is None:
        before = evaluate(drafter, base, held_chunks, lm_head, softcap)

    def step_loss(pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, str]]:
        outs = [out for p in pos.tolist() if (out := chunk_loss(drafter, base, chunk_of[p], lm_head, softcap))]
        slots = sum(len(out["agree"]) for out in outs)
        kl = sum(out["kl"] * len(out["agree"]) for out in outs) / max(slots, 1)
        top1 = torch.cat([out["agree"] for out in outs]).float().mean(0).tolist() if outs else []
        return kl.mean(), {"kl": f"{kl.mean().item():.3f}", "top1": "/".join(f"{a:.2f}" for a in top1)}

    drafter.train()
    checkpoint = Checkpoint(ckpt_path, identity, "drafter", before, earlier, started)
    step, losses = optimize(drafter, optimizer, step_loss, wins=wins, per_step=per_step, total=total, step=step,
                            config=config, checkpoint=checkpoint,
                            desc="EAGLE-3 drafter", progress=progress, stop_after=stop_after)
    drafter.eval()
    after = evaluate(drafter, base, held_chunks, lm_head, softcap) if step == total else {}
    return TrainResult(drafter, step, total, resumed_from, len(positions(base, train_chunks, steps_ahead)),
                       len(positions(base, held_chunks, steps_ahead)), checkpoint.seconds, losses, before, after)
