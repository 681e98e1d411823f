"""The micro-step drafter: up to ``max_micro_steps`` draft tokens per base step, and when to stop.

Convention (one base step): the base model just sampled x_{t+1} from its output at position t. The drafter
reads the base's hidden states at position t from F layers (``feature_layers``: HF ``output_hidden_states``
indices = vLLM ``aux_hidden_state_layers`` ids; entry i is the input of decoder layer i) and the tokens
x_{t+1}, x_{t+2}, ... one micro-step each:

    micro-step j input   u_j = W_in [RMSNorm_1(f_1) ... RMSNorm_F(f_F), RMSNorm_E(E(x_{t+1+j}))]
                         [hidden_size]: the same features at every micro-step; E is the base's frozen
                         token embedding, normed as each feature (as EAGLE-3 does) so that the token is
                         not a small signal beside the features (SmolLM2's embedding rows have RMS 0.13)
    trunk                1-2 Llama decoder layers (RMSNorm, GQA self-attention with RoPE at positions
                         0..j, causal over the micro-steps of this step only: no KV cache across steps,
                         at most max_micro_steps positions; SwiGLU MLP), final RMSNorm -> s_j
    logits_j             lm_head(W_out s_j) (the base's frozen LM head; W_out = identity when the drafter
                         is as wide as the base)                                     predicts x_{t+2+j}
    p_continue_j         sigmoid(MLP([s_j, max log q_j, H(q_j)])), q_j = softmax(logits_j): P(the token
                         drafted at micro-step j is what the base would emit there). The top-1 log-prob
                         and entropy of the drafter's own distribution are given to the stop head as two
                         extra inputs (detached): confidence is the best single predictor of acceptance
                         and a small MLP cannot compute a softmax over the vocabulary from s_j.

``draft`` runs the micro-steps greedily and keeps drafted token j iff p_continue_j >= stop_threshold; a
row stops at its first rejection. The base embedding and LM head are attached (``attach_base``), never
trained or saved with the drafter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afterburner.spec_decode.stop_head import StopHead


@dataclass
class DrafterConfig:
    base_hidden_size: int
    vocab_size: int
    feature_layers: tuple[int, ...]  # HF hidden_states indices of the base (1 .. num_base_layers - 1)
    hidden_size: int  # drafter width
    num_layers: int = 1  # decoder layers (1-2)
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1024
    max_micro_steps: int = 4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    stop_threshold: float = 0.8  # default P(continue) a drafted token needs to be kept
    base_model: str = ""  # informational: the base this drafter was trained for

    def __post_init__(self):
        self.feature_layers = tuple(self.feature_layers)
        positive = ("base_hidden_size", "vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_micro_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"drafter config: {name} must be a positive integer, got {value!r}")
        if self.num_layers not in (1, 2):
            raise ValueError(f"drafter config: num_layers must be 1 or 2, got {self.num_layers!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"drafter config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if not self.feature_layers or any(not isinstance(i, int) or i < 1 for i in self.feature_layers):
            raise ValueError(f"drafter config: feature_layers must be layer ids >= 1, got {list(self.feature_layers)}")
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"drafter config: feature_layers has duplicates: {list(self.feature_layers)}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"drafter config: {name} must be a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.stop_threshold, (int, float)) or not 0 <= self.stop_threshold <= 1:
            raise ValueError(f"drafter config: stop_threshold must be in [0, 1], got {self.stop_threshold!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["feature_layers"] = list(self.feature_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DrafterConfig:
        if not isinstance(data, dict):
            raise ValueError(f"drafter config: expected an object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"drafter config: unknown field {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"drafter config: missing field {missing[0]!r}")
        if not isinstance(data["feature_layers"], (list, tuple)):
            raise ValueError(f"drafter config: feature_layers must be a list of layer ids, got "
                             f"{data['feature_layers']!r}")
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin) [S, dim] of Llama's rotary angles at ``positions`` [S]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # [S, D/2]
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1) * sin


def rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half layout); x [B, heads, S, D], positions [S]."""
    return _rotate(x, *_cos_sin(positions.to(x.device), x.shape[-1], theta, x.dtype))


@functools.lru_cache(maxsize=32)
def _rope_table(length: int, dim: int, theta: float, dtype: torch.dtype, device: torch.device):
    """``_cos_sin`` at positions 0..length-1, built once, not at every micro-step (as ordinary tensors even
    under inference mode, so that training may reuse them)."""
    with torch.inference_mode(False), torch.no_grad():
        return _cos_sin(torch.arange(length, device=device), dim, theta, dtype)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """``rope_at`` positions 0..T-1; x [B, heads, T, D]."""
    return _rotate(x, *_rope_table(x.shape[-2], x.shape[-1], float(theta), x.dtype, x.device))


class DecoderLayer(nn.Module):
    """A Llama decoder layer with causal self-attention over the micro-steps of one step."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, hidden]
        c, (b, t, _) = self.c, x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)  # [B, heads, T, D]
        k = self.k_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [B, kv_heads, T, D]
        v = self.v_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, c.rope_theta), rope(k, c.rope_theta)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=c.num_heads != c.num_kv_heads)  # [B, heads, T, D]
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class MicroStepDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = c = config
        self.feature_norms = nn.ModuleList(RMSNorm(c.base_hidden_size, c.rms_norm_eps) for _ in c.feature_layers)
        self.embed_norm = RMSNorm(c.base_hidden_size, c.rms_norm_eps)
        self.fc_in = nn.Linear((len(c.feature_layers) + 1) * c.base_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        wide = c.hidden_size == c.base_hidden_size
        self.fc_out = nn.Identity() if wide else nn.Linear(c.hidden_size, c.base_hidden_size, bias=False)
        self.stop_head = StopHead(c.hidden_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # the base's frozen token embedding and LM head [V, H_base]: buffers, not parameters, not saved
        self.register_buffer("embed_weight", None, persistent=False)
        self.register_buffer("lm_head_weight", None, persistent=False)
        self.vocab_ids: torch.Tensor | None = None  # drafting vocabulary (attach_base); None: the whole one
        self._project = None  # the LM head as an engine applies it (attach_base's linear); None: torch
        self._input_parts = None  # fc_in's feature and token halves as an engine applies them (attach_base)

    def attach_base(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                    vocab_ids: torch.Tensor | None = None, *, linear=None) -> MicroStepDrafter:
        """Use the base model's token embedding and LM head (both [V, H_base]; tied models pass one twice).
        ``vocab_ids`` [N]: draft from these tokens only (``spec_decode.draft_vocab``): logits are over them,
        and ``draft`` maps back to token ids; the stop head then sees confidence over them too.
        ``linear(weight) -> x -> x @ weight.T``: how an engine wants the LM head applied (default torch)."""
        c = self.config
        for name, weight in (("embed_weight", embed_weight), ("lm_head_weight", lm_head_weight)):
            if tuple(weight.shape) != (c.vocab_size, c.base_hidden_size):
                raise ValueError(f"attach_base: {name} has shape {tuple(weight.shape)}, expected "
                                 f"[vocab_size, base_hidden_size] = {[c.vocab_size, c.base_hidden_size]}")
        dtype = self.fc_in.weight.dtype
        self.embed_weight = embed_weight.detach().to(device=self.fc_in.weight.device, dtype=dtype)
        if vocab_ids is not None:
            lm_head_weight = lm_head_weight[vocab_ids]
        self.lm_head_weight = lm_head_weight.detach().to(device=self.fc_in.weight.device, dtype=dtype)
        self.vocab_ids = vocab_ids
        self._project = None if linear is None else linear(self.lm_head_weight)
        # an engine's weights are final once attached: its linear may prepack fc_in's halves (_input)
        self._input_parts = None if linear is None else tuple(linear(w) for w in self._input_halves())
        return self

    def _input(self, part: int, x: torch.Tensor) -> torch.Tensor:
        """fc_in on its feature half (part 0) or token half (1): u_j = W_f f + W_e e_j, and W_f f is the same
        at every micro-step of a step (``draft`` computes it once)."""
        if self._input_parts is not None:
            return self._input_parts[part](x)
        return F.linear(x, self._input_halves()[part])

    def _input_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc_in's weight split into its feature columns [hidden, F*H_base] and token columns [hidden, H_base]."""
        split = len(self.config.feature_layers) * self.config.base_hidden_size
        return self.fc_in.weight[:, :split], self.fc_in.weight[:, split:]

    def step_states(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] final normed micro-step states s_j; features [B, F, H_base], tokens [B, T]."""
        return self._states(self._feature_input(self._checked(features)), tokens)

    def _checked(self, features: torch.Tensor) -> torch.Tensor:
        if self.embed_weight is None:
            raise RuntimeError("MicroStepDrafter: call attach_base(embed, lm_head) first")
        c = self.config
        if features.shape[1:] != (len(c.feature_layers), c.base_hidden_size):
            raise ValueError(f"features have shape {tuple(features.shape)}, expected [B, "
                             f"{len(c.feature_layers)}, {c.base_hidden_size}]")
        return features

    def _feature_input(self, features: torch.Tensor) -> torch.Tensor:
        """[B, hidden]: W_f [RMSNorm_1(f_1) ... RMSNorm_F(f_F)], the features' share of every micro-step's input."""
        features = features.to(self.fc_in.weight.dtype)
        normed = torch.cat([norm(features[:, i]) for i, norm in enumerate(self.feature_norms)], -1)  # [B, F*H]
        return self._input(0, normed)

    def _states(self, feature_input: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embed_norm(F.embedding(tokens, self.embed_weight))  # [B, T, H_base]
        x = feature_input[:, None] + self._input(1, embedded)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def heads(self, states: torch.Tensor, stop: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [..., V], p_continue [...]) from micro-step states [..., hidden]; ``stop=False``: the
        stop head is not run (p_continue None), for drafts of a fixed length."""
        out = self.fc_out(states)
        logits = out @ self.lm_head_weight.T if self._project is None else self._project(out)
        if not stop:
            return logits, None
        # detached: the stop head reads the state, its loss does not reshape it (train.py)
        return logits, self.stop_head.p_accept(states.detach(), logits)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, F, H_base] (base position t), tokens [B, T] (x_{t+1}, ..., x_{t+T}) ->
        (logits [B, T, V]: logits[:, j] predicts x_{t+2+j}; p_continue [B, T])."""
        return self.heads(self.step_states(features, tokens))

    @torch.no_grad()
    def draft(self, features: torch.Tensor, last_tokens: torch.Tensor, *, max_tokens: int,
              stop_threshold: float | None, min_tokens: int = 0) -> list[list[int]]:
        """Greedy drafts per row, features [B, F, H_base], last_tokens [B] (x_{t+1}): drafted token j is
        kept iff j < min_tokens or p_continue_j >= stop_threshold (None or 0: always, exactly max_tokens); a
        row ends at its first rejection (0 tokens possible without ``min_tokens``). Rows stop independently;
        the batch runs until all have."""
        if not 0 <= max_tokens <= self.config.max_micro_steps:
            raise ValueError(f"draft: max_tokens must be in 0..max_micro_steps={self.config.max_micro_steps}, "
                             f"got {max_tokens}")
        tokens = last_tokens.reshape(-1, 1).long()  # [B, 1 + drafted so far]
        alive = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        lengths = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        feature_input = self._feature_input(self._checked(features))
        for step in range(max_tokens):
            # no cache: recompute all micro-steps (at most max_micro_steps positions); causal, so earlier
            # micro-steps come out as before
            logits, p_continue = self.heads(self._states(feature_input, tokens)[:, -1], stop=bool(stop_threshold))
            drafted = logits.argmax(-1)  # [B]
            if self.vocab_ids is not None:
                drafted = self.vocab_ids[drafted]
            if stop_threshold and step >= min_tokens:
                alive &= p_continue >= stop_threshold
            lengths += alive.long()
            if not alive.any():
                break
            tokens = torch.cat([tokens, drafted[:, None]], 1)
        return [row[1:1 + n].tolist() for row, n in zip(tokens, lengths.tolist(), strict=True)]

    @torch.no_grad()
    def draft_topk(self, features: torch.Tensor, last_tokens: torch.Tensor, *, depth: int, topk: int) -> torch.Tensor:
        """[B, depth, topk] token ids: the ``topk`` best tokens at each micro-step of the greedy chain (column
        0 is the chain; no stop head): what a token tree from the first micro-steps is filled with."""
        if not 1 <= depth <= self.config.max_micro_steps:
            raise ValueError(f"draft_topk: depth must be in 1..max_micro_steps={self.config.max_micro_steps}, "
                             f"got {depth}")
        tokens, rows = last_tokens.reshape(-1, 1).long(), []
        feature_input = self._feature_input(self._checked(features))
        for _ in range(depth):
            logits, _ = self.heads(self._states(feature_input, tokens)[:, -1], stop=False)
            best = logits.topk(topk, dim=-1).indices  # [B, topk]
            if self.vocab_ids is not None:
                best = self.vocab_ids[best]
            rows.append(best)
            tokens = torch.cat([tokens, best[:, :1]], 1)
        return torch.stack(rows, 1)
