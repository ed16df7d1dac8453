"""Gets tokens through identity-binding-proxy with the official Python SDK (azure-identity) in
proxy mode, reading the AZURE_* environment as a pod would.

One request per line of stdin, one JSON line per request on stdout:
  get <scope>    the credential built at start (so the SDK's own CA-file handling is used)
  fresh <scope>  a new credential (so the SDK's in-memory token cache is not)
{"ok": true, "token": ..., "expires_on": <unix secs>} or {"ok": false, "error": "<text>"}.
"""
import json
import sys

from azure.identity import WorkloadIdentityCredential


def new_credential():
    return WorkloadIdentityCredential(enable_azure_proxy=True)


def get(credential, scope):
    try:
        token = credential.get_token(scope)
        return {"ok": True, "token": token.token, "expires_on": token.expires_on}
    except Exception as e:  # the test asserts on the text users would see
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


shared, shared_error = None, None
try:
    shared = new_credential()
except Exception as e:
    shared_error = {"ok": False, "error": f"{type(e).__name__}: {e}"}

for line in sys.stdin:
    mode, _, scope = line.strip().partition(" ")
    if mode == "get":
        reply = get(shared, scope) if shared else shared_error
    elif mode == "fresh":
        try:
            reply = get(new_credential(), scope)
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    else:
        reply = {"ok": False, "error": f"unknown command {mode!r}"}
    print(json.dumps(reply), flush=True)
