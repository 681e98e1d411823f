"""Start `vllm serve` as the demo does, print its process group once healthy, then hang (the test kills
this process with SIGKILL: no cleanup of its own runs).

    python tests/vllm/scripts/serve_then_hang.py MODEL_DIR LOG_FILE
"""

import sys
import time
from pathlib import Path

from afterburner.plugins.devtools.vllm_server import VllmServer

if __name__ == "__main__":
    server = VllmServer(Path(sys.argv[1]), log=Path(sys.argv[2])).start().wait(timeout=300)
    print(f"PGID {server.pgid} WATCHDOG {server.watchdog.pid}", flush=True)
    time.sleep(3600)
