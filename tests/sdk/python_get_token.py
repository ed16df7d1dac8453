"""Gets a token through identity-binding-proxy with the official Python SDK in proxy mode.

Reads the AZURE_* environment like a pod would; prints one JSON line:
{"ok": true, "token": ..., "expires_on": ...} or {"ok": false, "error": "<exception text>"}.
"""
import json
import sys

from azure.identity import WorkloadIdentityCredential

scope = sys.argv[1] if len(sys.argv) > 1 else "https://vault.azure.net/.default"
try:
    credential = WorkloadIdentityCredential(enable_azure_proxy=True)
    token = credential.get_token(scope)
    print(json.dumps({"ok": True, "token": token.token, "expires_on": token.expires_on}))
except Exception as e:  # the test asserts on the message users would see
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
