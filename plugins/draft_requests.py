"""What serving a draft model per request needs in either engine (SpecPC and SpecKV, on vLLM and SGLang):
the draft folder's startup check, each process's loaded drafts, one draft run at a time on afterburner's draft
thread, a request's capacity as the request gives it (vLLM: ``vllm_xargs``; SGLang: ``custom_params``), and
SpecKV's choice packed to travel with the request from where requests are taken to the engine's attention.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afterburner.plugins.config import ConfigError, PromptCompressionSettings
from afterburner.plugins.config import SpecKVSettings as SpecKVConfig
from afterburner.plugins.log import get_logger
from afterburner.spec_decode.draft.speckv import SpecKVSettings
from afterburner.spec_decode.draft.speckv_draft import KeptKV, speckv_keep
from afterburner.spec_decode.draft.specpc import SpecPCSettings
from afterburner.spec_decode.draft.specpc_draft import Compressed, Draft, compress_ids, load_draft

logger = get_logger(__name__)
_drafts: dict[Path, Draft] = {}  # loaded drafts by resolved folder: loading costs seconds
DRAFT_LOCK = threading.Lock()  # one draft run at a time (request threads share drafts)
# Where served requests' drafts run, so an engine's event loop awaits them instead of running them.
DRAFT_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afterburner-draft")


async def on_draft_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """``fn(*args, **kwargs)`` on the draft thread while the caller's event loop serves others: (its result,
    the thread's name, which report events carry)."""
    def run():
        return fn(*args, **kwargs), threading.current_thread().name

    return await asyncio.get_running_loop().run_in_executor(DRAFT_EXECUTOR, run)


def loaded_draft(draft_dir: str | Path) -> Draft:
    """This process's draft from ``draft_dir`` (loaded at first use; said once)."""
    path = Path(draft_dir).resolve()
    if path not in _drafts:
        logger.info("afterburner: loading the draft %s (first request that asks for it)", path)
        _drafts[path] = load_draft(path)
    return _drafts[path]


def check_draft_folder(folder: str | Path, target_vocab: int | None, *, where: str) -> dict:
    """A draft folder's config.json, checked against the served model's vocabulary (``ConfigError``)."""
    folder = Path(folder)
    try:
        draft = json.loads((folder / "config.json").read_text())
        vocab = draft["vocab_size"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{where}: {folder} is not a model folder with a config.json naming vocab_size "
                          f"({type(exc).__name__}: {exc}); build one with `afterburner models draft`") from None
    if target_vocab is not None and vocab != target_vocab:
        raise ConfigError(f"{where}: the draft's vocabulary has {vocab} tokens, the served model's {target_vocab}: "
                          "the draft must share the model's tokenizer")
    return draft


def check_speckv_draft(folder: str | Path, target: Mapping[str, Any], *, where: str) -> dict:
    """A SpecKV draft folder against the served model's config.json fields (``ConfigError``): the same
    vocabulary, and kv heads that map to the model's one to one."""
    draft = check_draft_folder(folder, target.get("vocab_size"), where=where)
    target_heads = target.get("num_key_value_heads")
    draft_heads = draft.get("num_key_value_heads", draft.get("num_attention_heads"))
    if target_heads is not None and draft_heads != target_heads:
        raise ConfigError(f"{where}: the draft has {draft_heads} kv heads, the served model {target_heads}: "
                          "SpecKV maps the draft's kv heads to the model's one to one")
    return draft


def requested_capacity(params: Mapping[str, Any] | None, key: str, *, channel: str) -> int | None:
    """The request's capacity under ``key`` of its ``channel`` (None: it asks for none); ``ValueError`` when
    not an integer."""
    if not params or key not in params:
        return None
    capacity = params[key]
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ValueError(f"afterburner: {channel} {key} must be an integer (prompt tokens to keep), "
                         f"got {capacity!r:.60}")
    return capacity


def check_rule(rule: Callable[[Any, int], Any], settings: Any, capacity: int, *, channel: str, key: str) -> None:
    """Admission: ``rule(settings, capacity)`` accepts the request's capacity, else a one-line ``ValueError``
    naming where the request gave it."""
    try:
        rule(settings, capacity)
    except ValueError as exc:
        raise ValueError(f"afterburner: {channel} {key}: {exc}") from None


def specpc_rule(settings: PromptCompressionSettings, capacity: int) -> SpecPCSettings:
    """The SpecPC rule a request's capacity asks for, with the server's settings (``ValueError``: a bad one)."""
    return SpecPCSettings(capacity=capacity, **settings.model_dump(exclude={"draft"}))


def compress_served(settings: PromptCompressionSettings, prompt: list[int], capacity: int) -> Compressed | None:
    """What the server's SpecPC draft keeps of ``prompt`` (None: the prompt fits)."""
    if len(prompt) <= capacity:
        return None
    with DRAFT_LOCK:
        return compress_ids(loaded_draft(settings.draft), prompt, specpc_rule(settings, capacity))


def speckv_rule(settings: SpecKVConfig, capacity: int) -> SpecKVSettings:
    """The SpecKV rule a request's capacity asks for, with the server's settings (``ValueError``: a bad one)."""
    return SpecKVSettings(capacity=capacity, **settings.model_dump(exclude={"draft", "compact_mib"}))


def choose_served(settings: SpecKVConfig, prompt: list[int], capacity: int, *, target_layers: int) -> KeptKV | None:
    """The server's SpecKV draft's choice for ``prompt`` (None: a prompt within the capacity carries none and
    decodes densely, as the paper)."""
    rule = speckv_rule(settings, capacity)
    if rule.keeps_all(len(prompt)):
        return None
    with DRAFT_LOCK:
        return speckv_keep(loaded_draft(settings.draft), prompt, rule, target_layers=target_layers)


def pack(mask: torch.Tensor) -> dict:
    """SpecKV's choice [layers, Hkv, prompt_len] bool -> what a request carries (a shape and bytes: msgpack and
    pickle both take it)."""
    return {"shape": list(mask.shape), "bits": np.packbits(mask.numpy().ravel()).tobytes()}


def unpack(packed: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(packed["shape"])
    bits = np.unpackbits(np.frombuffer(packed["bits"], dtype=np.uint8), count=int(np.prod(shape)))
    return torch.from_numpy(bits.astype(bool).reshape(shape))
