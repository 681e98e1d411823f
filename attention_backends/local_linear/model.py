"""A minimal Llama in torch with pluggable attention: softmax (SDPA) or Local Linear Attention.

Parameter names and math are Hugging Face ``LlamaForCausalLM``'s (RMSNorm, rotary embeddings with
``rotate_half``, SwiGLU MLP, grouped-query heads, untied lm_head), so ``hf_state_dict`` loads into it and
into the engines' Llama loaders unchanged. The one addition: with ``attention="local_linear"`` every layer
holds its ridge strength lambda (``log_lambda``, learnable or fixed), which is saved in config.json as
``afterburner_local_linear_lambda`` (one float per layer), never among the weights.

LLA runs batch-folded: heads are independent, so [B, T, H, D] becomes [T, B * H, D] (query head b * Hq + h
reads kv head b * Hkv + h // G, the grouping ``local_linear_blockwise`` applies). Training uses
``implicit.local_linear_implicit`` (gradients through the solve by implicit differentiation; its CG
settings are ``LlamaShape.train_cg_*``); evaluation without gradients uses ``local_linear_blockwise`` with
the FlashLLA defaults, the numbers the engines compute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afterburner.attention_backends.local_linear.blockwise import local_linear_blockwise
from afterburner.attention_backends.local_linear.implicit import local_linear_implicit

LAMBDA_KEY = "afterburner_local_linear_lambda"
# The architecture name a trained LLA model's config.json carries: the plugin registers it (vLLM's Llama
# model under afterburner's local-linear attention); an engine without afterburner refuses it instead of
# serving the weights with softmax attention. model_type stays "llama", so transformers still loads it.
ARCHITECTURE = "AfterburnerLocalLinearLlamaForCausalLM"
ATTENTIONS = ("softmax", "local_linear")


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention: str = "softmax"  # or "local_linear"
    lla_lambda: float = 1.0  # initial (or fixed) lambda of every layer
    learn_lambda: bool = True
    train_cg_max_iters: int = 16  # CG while training (implicit.py); evaluation uses the defaults
    train_cg_rtol: float = 1e-8  # squared residual: ~1e-4 relative in the residual norm

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide into heads, and query heads into kv heads")
        if not self.lla_lambda > 0:
            raise ValueError(f"lla_lambda must be > 0, got {self.lla_lambda}")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] (HF Llama's default rope: the half-dimension frequencies repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x [B, T, H, D]; cos, sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        d, hq, hkv = shape.head_dim, shape.num_attention_heads, shape.num_key_value_heads
        self.shape = shape
        self.q_proj = nn.Linear(shape.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(shape.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(shape.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, shape.hidden_size, bias=False)
        if shape.attention == "local_linear":
            log_lambda = torch.tensor(math.log(shape.lla_lambda))
            if shape.learn_lambda:
                self.log_lambda = nn.Parameter(log_lambda)
            else:
                self.register_buffer("log_lambda", log_lambda)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        s, d = self.shape, self.shape.head_dim
        q = apply_rotary(self.q_proj(x).view(b, t, s.num_attention_heads, d), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, t, s.num_key_value_heads, d), cos, sin)
        v = self.v_proj(x).view(b, t, s.num_key_value_heads, d)
        if s.attention == "softmax":
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            out = self._local_linear(q, k, v)
        return self.o_proj(out.reshape(b, t, -1))

    def lam(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def _local_linear(self, q, k, v):
        b, t, hq, d = q.shape
        fold = lambda x: x.transpose(0, 1).reshape(t, -1, d)  # noqa: E731  [B, T, H, D] -> [T, B * H, D]
        lam = self.lam().expand(b * hq)
        if torch.is_grad_enabled():
            out = local_linear_implicit(fold(q), fold(k), fold(v), scale=d ** -0.5, lam=lam,
                                        cg_max_iters=self.shape.train_cg_max_iters, cg_rtol=self.shape.train_cg_rtol)
        else:
            out = local_linear_blockwise(fold(q), fold(k), fold(v), scale=d ** -0.5, lam=lam)
        return out.view(t, b, hq, d).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.self_attn = Attention(shape)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class TinyLlama(nn.Module):
    """tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.model = Backbone(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.apply(_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(torch.arange(tokens.shape[1]), self.shape.head_dim, self.shape.rope_theta)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def lambdas(self) -> list[float] | None:
        """lambda of each layer (LLA), or None (softmax)."""
        if self.shape.attention != "local_linear":
            return None
        return [float(layer.self_attn.lam().detach()) for layer in self.model.layers]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights LlamaForCausalLM expects (lambda excluded: it lives in config.json)."""
        return {name: t.detach().contiguous() for name, t in self.state_dict().items()
                if not name.endswith("log_lambda")}

    def hf_config(self, **extra) -> dict:
        """``transformers.LlamaConfig`` arguments; LLA models add ``LAMBDA_KEY``."""
        s = self.shape
        config = {"architectures": ["LlamaForCausalLM"], "vocab_size": s.vocab_size,
                  "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
                  "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
                  "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim,
                  "max_position_embeddings": s.max_position_embeddings, "rope_theta": s.rope_theta,
                  "rms_norm_eps": s.rms_norm_eps, "hidden_act": "silu", "attention_bias": False,
                  "mlp_bias": False, "tie_word_embeddings": False, "dtype": "float32", **extra}
        if s.attention == "local_linear":
            config[LAMBDA_KEY] = self.lambdas()
            config["architectures"] = [ARCHITECTURE]
        return config

    def shape_dict(self) -> dict:
        return asdict(self.shape)


def _init(module: nn.Module) -> None:
    """HF Llama's initialisation (normal, std 0.02)."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
