"""``python tests/fault_driver.py FAULTS_JSON ebm-args...``: the ``ebm`` command with the Train
workers of this driver running :func:`faults.worker_with_faults` (for tests that kill or signal a
driver process)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faults  # noqa: E402

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec:
        import pipelines.worker.loop as loop
        faults.register_by_value()
        loop.worker_loop = faults.worker_with_faults(spec)
    from pipelines.cli import main
    sys.exit(main(sys.argv[2:]))
