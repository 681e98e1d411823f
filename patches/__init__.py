"""Version-guarded engine patches (README, Supported versions). One file per feature; the lists below are the order in
which each engine's adapter applies them. Only ``afterburner.plugins`` applies patches."""

from afterburner.patches.sglang_check_server_args import CHECK_SERVER_ARGS
from afterburner.patches.sglang_prompt_compression import BATCH_PROMPT_COMPRESSION
from afterburner.patches.sglang_prompt_compression import PROMPT_COMPRESSION as SGLANG_PROMPT_COMPRESSION
from afterburner.patches.sglang_speckv_requests import SPECKV_REQUESTS
from afterburner.patches.vllm_async_drafts import ASYNC_DRAFTS
from afterburner.patches.vllm_cpu_sampling import CPU_EXPAND
from afterburner.patches.vllm_engine_config import ENGINE_CONFIG
from afterburner.patches.vllm_prompt_compression import PROMPT_COMPRESSION
from afterburner.patches.vllm_request_admission import REQUEST_ADMISSION
from afterburner.patches.vllm_speculative_awrs import SPECULATIVE_AWRS, SPECULATIVE_AWRS_DRAFTS
from afterburner.patches.vllm_tree_speculation import TREE_SPECULATION_PATCHES
from afterburner.patches.vllm_worker_init_device import WORKER_INIT_DEVICE

VLLM_PATCHES = (ENGINE_CONFIG, WORKER_INIT_DEVICE, REQUEST_ADMISSION, PROMPT_COMPRESSION, ASYNC_DRAFTS,
                *TREE_SPECULATION_PATCHES,
                SPECULATIVE_AWRS, SPECULATIVE_AWRS_DRAFTS, CPU_EXPAND)
SGLANG_PATCHES = (CHECK_SERVER_ARGS, SGLANG_PROMPT_COMPRESSION, BATCH_PROMPT_COMPRESSION, SPECKV_REQUESTS)
