"""Medusa heads: head k (k = 1..K) reads the base model's last hidden state h_t and predicts token t+1+k
(the base model's own lm_head predicts t+1).

Each head is ``num_layers`` residual blocks h <- h + SiLU(W h + b), then a vocabulary projection: its own
(``lm_heads[k]``, as FasterDecoding trains them) or the base model's lm_head (``shared_lm_head``: far fewer
weights to train and store; the weight is passed to ``forward``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    shared_lm_head: bool = False
    bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers))
        for layer in self.layers:  # start as the identity: an untrained head copies the base model's guess
            nn.init.zeros_(layer.weight)
            if bias:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            ResidualBlock(config.hidden_size, config.num_layers, config.bias) for _ in range(config.num_heads))
        self.lm_heads = None if config.shared_lm_head else nn.ModuleList(
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads))

    def hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[K, N, H]: each head's features for hidden states [N, H]."""
        return torch.stack([block(hidden_states) for block in self.blocks])

    def forward(self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [K, N, V] for hidden states [N, H]; ``lm_head_weight`` [V, H] is required (and only used)
        with a shared lm_head."""
        features = self.hidden(hidden_states)
        if self.lm_heads is None:
            if lm_head_weight is None:
                raise ValueError("these Medusa heads share the base model's lm_head: pass lm_head_weight")
            return features @ lm_head_weight.to(features.dtype).T
        return torch.stack([head(f) for head, f in zip(self.lm_heads, features, strict=False)])
