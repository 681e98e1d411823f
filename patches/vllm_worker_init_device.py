"""Tell afterburner which config reached a worker process.

Workers receive the ``VllmConfig`` pickled (no ``__post_init__`` re-runs there), and general plugins are
loaded inside ``init_worker`` before the worker object exists. ``WorkerWrapperBase.init_device`` is the
first call after that with ``self.vllm_config`` set, in every executor (uni, mp).
"""

from afterburner.patches.base import Patch

WORKER_INIT_DEVICE = Patch(
    name="vllm.worker_init_device",
    target="vllm.v1.worker.worker_base:WorkerWrapperBase.init_device",
    verified_on=">=0.32.0,<0.34",
    when="after",  # hook(None, worker_wrapper)
    expects_params=("self",),
)
