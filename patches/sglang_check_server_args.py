"""Validate afterburner's settings where SGLang validates its own, in the process the user sees.

``Engine._launch_subprocesses`` (behind ``sglang.Engine``, ``sglang serve`` and ``launch_server`` alike)
calls ``ServerArgs.check_server_args`` in the user's process before the scheduler and detokenizer
start, so a bad ``AFTERBURNER_CONFIG`` stops startup there with our message. Raising from the plugin
function itself would not: SGLang's ``load_plugins`` logs and swallows what plugin functions raise.
"""

from afterburner.patches.base import Patch

CHECK_SERVER_ARGS = Patch(
    name="sglang.check_server_args",
    target="sglang.srt.server_args:ServerArgs.check_server_args",
    verified_on=">=0.5.23,<0.6",
    when="before",  # hook(server_args)
    expects_params=("self",),
)
