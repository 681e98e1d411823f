"""Drafts per request on SGLang: after SGLang's tokenizer manager has turned a request into the tokenized
request it sends to the scheduler (one at a time, or a batch of pre-tokenized prompts at once), afterburner
replaces the prompt's token ids with the ones a draft model keeps (SpecPC, ``plugins/sglang/specpc.py``) and
adds the KV entries a draft chooses for decoding (SpecKV, ``plugins/sglang/speckv.py``); the drafts run on
afterburner's draft thread while the manager's event loop awaits them."""

from afterburner.patches.base import Patch

PROMPT_COMPRESSION = Patch(
    name="sglang.prompt_compression",
    target="sglang.srt.managers.tokenizer_manager:TokenizerManager._tokenize_one_request",
    verified_on=">=0.5.23,<0.6",
    when="after_async",  # await hook(tokenized, manager, obj); a ValueError refuses that request
    expects_params=("self", "obj"),
)
BATCH_PROMPT_COMPRESSION = Patch(
    name="sglang.batch_prompt_compression",
    target="sglang.srt.managers.tokenizer_manager:TokenizerManager._batch_tokenize_and_process",
    verified_on=">=0.5.23,<0.6",
    when="after_async",  # await hook([tokenized, ...], manager, batch_size, obj)
    expects_params=("self", "batch_size", "obj"),
)
