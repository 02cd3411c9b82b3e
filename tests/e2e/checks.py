"""The runner of the end-to-end check scripts: every `check_*` function of a
module, in definition order, one PASS/FAIL line each (with the traceback of a
failure), then a summary; exit status 1 if any failed."""

import socket
import sys
import time
import traceback


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(namespace):
    checks = [v for k, v in namespace.items() if k.startswith("check_") and callable(v)]
    failed = 0
    for check in checks:
        t0 = time.time()
        try:
            check()
            print(f"PASS {check.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {check.__name__}", flush=True)
            traceback.print_exc()
    print(f"{len(checks) - failed}/{len(checks)} checks passed")
    sys.exit(1 if failed else 0)
