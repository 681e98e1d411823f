"""SpecKV per request on SGLang: when the scheduler makes its ``Req`` from a tokenized request, the draft's
choice that travelled in the request's ``custom_params`` is unpacked once and kept with the request, where the
afterburner-speckv attention backend finds it by request id (``plugins/sglang/speckv.py``)."""

from afterburner.patches.base import Patch

SPECKV_REQUESTS = Patch(
    name="sglang.speckv_requests",
    target="sglang.srt.managers.schedule_batch:Req.__init__",
    verified_on=">=0.5.23,<0.6",
    when="after",  # hook(None, req, rid, origin_input_text, origin_input_ids, sampling_params, ...)
    expects_params=("self", "rid", "sampling_params"),
)
