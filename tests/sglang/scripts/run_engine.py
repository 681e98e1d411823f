"""Start an SGLang Engine on CPU in a fresh process, generate greedily, print the token ids as JSON.

    python tests/sglang/scripts/run_engine.py MODEL_DIR

For runs that need their own processes (afterburner disabled in all of them); the caller sets the
environment (``engine_setup.cpu_env()``, ``AFTERBURNER_*``).
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/sglang: engine_setup
    import sglang
    from engine_setup import ENGINE_KWARGS, greedy_ids

    engine = sglang.Engine(model_path=sys.argv[1], **ENGINE_KWARGS)
    try:
        print_result(greedy_ids(engine))
    finally:
        engine.shutdown()
