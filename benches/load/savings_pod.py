"""One pod of the load harness's savings stage: the official Python SDK (azure-identity)
asking `get_token(scope)` once a second until SIGTERM (or a hard deadline), as an app asking
per request does.

    python savings_pod.py direct|proxy SCOPE DEADLINE_UNIX_SECS

direct: `WorkloadIdentityCredential()` (classic workload identity: the SDK exchanges the
projected token with Entra itself); proxy: `WorkloadIdentityCredential(enable_azure_proxy=True)`
(the SDK asks the node's proxy). Both read the AZURE_* environment as a pod does. Prints one
JSON line at the end: {"ok": n, "failed": n, "error": first error text or null,
"first_expires_in": seconds the first token had left}. Tokens are never printed.
"""
import json
import signal
import sys
import time

from azure.identity import WorkloadIdentityCredential

stop = False


def on_term(_signum, _frame):
    global stop
    stop = True


def main():
    signal.signal(signal.SIGTERM, on_term)
    mode, scope, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ok, failed, error, expires_in = 0, 0, None, None
    try:
        credential = WorkloadIdentityCredential(enable_azure_proxy=(mode == "proxy"))
    except Exception as e:  # reported, not raised: the harness counts failed pods
        print(json.dumps({"ok": 0, "failed": 1, "error": f"{type(e).__name__}: {e}"}),
              flush=True)
        return
    start = time.time()
    k = 0
    while not stop and time.time() < deadline:
        try:
            token = credential.get_token(scope)
            if expires_in is None:
                expires_in = token.expires_on - int(time.time())
            ok += 1
        except Exception as e:
            failed += 1
            error = error or f"{type(e).__name__}: {e}"[:500]
        k += 1
        # Once a second; a SIGTERM interrupts the sleep.
        pause = min(start + k, deadline) - time.time()
        if pause > 0 and not stop:
            time.sleep(pause)
    print(json.dumps({"ok": ok, "failed": failed, "error": error,
                      "first_expires_in": expires_in}), flush=True)


if __name__ == "__main__":
    main()
