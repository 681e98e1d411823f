"""An EAGLE-3 drafter in vLLM's layout (``llama_eagle3.py``), in plain torch: the fixed-length baseline
vLLM's own ``"method": "eagle3"`` runs, trained by afterburner on the same features and corpus as the
micro-step drafter (spec_decode/hamburger).

Why not the micro-step drafter's own weights: the two are different networks. The micro-step drafter
re-reads the base's features at every micro-step and attends over the micro-steps of one base step only;
EAGLE-3 keeps its own KV cache over the whole sequence (one entry per position, written from the base's
features) and feeds its own output back as the next draft step's hidden state. So the baseline is the
same recipe (features, data, epochs, schedule), not the same tensors.

The network (names as vLLM's checkpoint loader reads them; H = the base's hidden size):

    hidden    g_t = fc([fc_norm_1(f_1,t) ... fc_norm_F(f_F,t)])          step 1: the base's features at t
              g   = the previous draft step's output ``pre``               steps >= 2
    midlayer  a = attn([input_layernorm(E(x)), hidden_norm(g)])           qkv read 2H; Llama GQA + RoPE
              r = g + a;  pre = r + mlp(post_attention_layernorm(r))
    logits    lm_head(norm(pre))                                          the base's frozen LM head

At base position t the step-1 input is (features at t, token x_{t+1}) at RoPE position t and predicts
x_{t+2}; draft step m sits at position t + m - 1 and attends to step-1 entries at 0..t and to the entries
of draft steps 2..m at this t (what vLLM's cache holds while it drafts). ``unroll`` computes exactly that
for every t at once, teacher-forced (training-time test, as EAGLE-3 trains); ``draft`` runs it greedily.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from afterburner.spec_decode.hamburger.drafter import DrafterConfig, RMSNorm, rope_at
from afterburner.spec_decode.stop_head import StopHead


def check_config(c: DrafterConfig) -> None:
    """EAGLE-3's shape constraints on a drafter config (its stop fields are unused here)."""
    if c.hidden_size != c.base_hidden_size:
        raise ValueError(f"EAGLE-3 drafter: hidden_size ({c.hidden_size}) must equal the base's "
                         f"({c.base_hidden_size}): vLLM feeds it the base's token embedding")
    if c.num_layers != 1:
        raise ValueError(f"EAGLE-3 drafter: one decoder layer (vLLM's midlayer), got num_layers={c.num_layers}")


class _Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class Eagle3Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        check_config(config)
        self.config = c = config
        self.fc_norm = nn.ModuleList(RMSNorm(c.hidden_size, c.rms_norm_eps) for _ in c.feature_layers)
        self.fc = nn.Linear(len(c.feature_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = _MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
        # the base's frozen token embedding and LM head [V, H]: buffers, not saved with the drafter
        self.register_buffer("embed_weight", None, persistent=False)
        self.register_buffer("lm_head_weight", None, persistent=False)

    def attach_base(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> Eagle3Drafter:
        c = self.config
        for name, weight in (("embed_weight", embed_weight), ("lm_head_weight", lm_head_weight)):
            if tuple(weight.shape) != (c.vocab_size, c.hidden_size):
                raise ValueError(f"attach_base: {name} has shape {tuple(weight.shape)}, expected "
                                 f"{[c.vocab_size, c.hidden_size]}")
        dtype, device = self.fc.weight.dtype, self.fc.weight.device
        self.embed_weight = embed_weight.detach().to(device=device, dtype=dtype)
        self.lm_head_weight = lm_head_weight.detach().to(device=device, dtype=dtype)
        return self

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """Step 1's hidden state g [..., H] from the base's features [..., F, H] (vLLM's combine_hidden_states)."""
        return self.fc(torch.cat([norm(features[..., i, :]) for i, norm in enumerate(self.fc_norm)], -1))

    def _step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              cache: tuple[torch.Tensor, torch.Tensor] | None, diagonal: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One draft step for query slots ``slots`` [S] (indices of step-1 positions) at RoPE ``positions``
        [S]: tokens [B, S], hidden [B, S, H]. ``cache`` (k, v) [B, kv_heads, T, D]: the step-1 entries
        (None: this is step 1, the queries are those entries); ``diagonal``: (k, v) [B, kv_heads, S, D] of
        the earlier draft steps >= 2 at the same slots. Returns (pre [B, S, H], this step's (k, v))."""
        c, layer = self.config, self.midlayer
        b, s = tokens.shape
        x = torch.cat([layer.input_layernorm(F.embedding(tokens, self.embed_weight)), layer.hidden_norm(hidden)], -1)
        attn = layer.self_attn
        q = rope_at(attn.q_proj(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2), positions, c.rope_theta)
        k = rope_at(attn.k_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2), positions, c.rope_theta)
        v = attn.v_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        group, scale = c.num_heads // c.num_kv_heads, c.head_dim ** -0.5
        k1, v1 = (k, v) if cache is None else cache
        k1, v1 = k1.repeat_interleave(group, 1), v1.repeat_interleave(group, 1)  # [B, heads, T, D]
        scores = (q @ k1.transpose(-1, -2)) * scale  # [B, heads, S, T]
        visible = torch.arange(k1.shape[2], device=q.device)[None, :] <= slots[:, None]  # causal over step 1
        scores = scores.masked_fill(~visible, float("-inf"))
        steps = [] if cache is None else [*diagonal, (k, v)]  # draft steps >= 2 see their own diagonal
        if steps:
            dk = torch.stack([dk.repeat_interleave(group, 1) for dk, _ in steps], -2)  # [B, heads, S, J, D]
            dv = torch.stack([dv.repeat_interleave(group, 1) for _, dv in steps], -2)
            weights = torch.softmax(torch.cat([scores, (q[..., None, :] * dk).sum(-1) * scale], -1), -1)
            t = scores.shape[-1]
            out = weights[..., :t] @ v1 + (weights[..., t:, None] * dv).sum(-2)
        else:
            out = torch.softmax(scores, -1) @ v1
        r = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, s, c.num_heads * c.head_dim))
        return r + layer.mlp(layer.post_attention_layernorm(r)), (k, v)

    def logits(self, pre: torch.Tensor) -> torch.Tensor:
        return self.norm(pre) @ self.lm_head_weight.T

    def unroll(self, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """Teacher-forced draft steps at every position: features [B, T, F, H] (base positions 0..T-1),
        tokens [B, T + steps - 1] (tokens[:, t + m - 1] = x_{t+m}, step m's input at slot t) -> logits
        [steps, B, T, V]; step m at slot t predicts x_{t+m+1}."""
        return self.logits(self.unroll_states(features, tokens, steps))

    def unroll_states(self, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """``unroll``'s draft-step outputs before the final norm, [steps, B, T, H] (what a stop head reads,
        normed, beside the logits)."""
        if self.embed_weight is None:
            raise RuntimeError("Eagle3Drafter: call attach_base(embed, lm_head) first")
        t = features.shape[1]
        slots = torch.arange(t, device=features.device)
        hidden, cache, diagonal, out = self.combine(features), None, [], []
        for m in range(steps):
            pre, kv = self._step(tokens[:, m:m + t], hidden, slots + m, slots, cache, diagonal)
            if cache is None:
                cache = kv
            else:
                diagonal.append(kv)
            out.append(pre)
            hidden = pre
        return torch.stack(out)

    @torch.no_grad()
    def draft(self, features: torch.Tensor, tokens: torch.Tensor, num_tokens: int, *,
              vocab_ids: torch.Tensor | None = None, stop_threshold: float | None = None,
              stop_head: StopHead | None = None, min_tokens: int = 0) -> list[int]:
        """Greedy draft of ``num_tokens`` after a sequence: features [T, F, H] at base positions 0..T-1,
        tokens [T] (x_1 .. x_T: each position's next token, the last one just emitted by the base);
        ``vocab_ids``: argmax over these tokens only (vLLM's draft_vocab_size / d2t); ``stop_threshold``: the
        chain ends before its first token whose draft probability (softmax over the drafting vocabulary) is
        below it (``confident_chain``'s rule), or with ``stop_head`` whose P(accepted) is below it (the head
        reads the normed draft state and the drafting vocabulary's logits, as ``stop_train`` fits it); the first
        ``min_tokens`` drafts are kept whatever they score."""
        t = features.shape[0]
        slots = torch.arange(t)
        pre, cache = self._step(tokens[None], self.combine(features[None]), slots, slots, None, [])
        last = torch.tensor([t - 1])
        drafted, diagonal = [], []
        for m in range(num_tokens):
            logits = self.logits(pre[:, -1])[0]
            scores = logits if vocab_ids is None else logits[vocab_ids]
            probability, best = scores.float().softmax(-1).max(-1)
            if stop_head is not None:
                probability = stop_head.p_accept(self.norm(pre[:, -1])[0], scores)
            if stop_threshold is not None and m >= min_tokens and bool(probability < stop_threshold):
                break
            token = int(best) if vocab_ids is None else int(vocab_ids[best])
            drafted.append(token)
            if m + 1 == num_tokens:
                break
            pre, kv = self._step(torch.tensor([[token]]), pre[:, -1:], last + m + 1, last, cache, diagonal)
            diagonal.append(kv)
        return drafted
