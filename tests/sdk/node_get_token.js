// Gets a token through identity-binding-proxy with the official Node SDK in proxy mode.
// Reads the AZURE_* environment like a pod would; prints one JSON line:
// {"ok": true, "token": ..., "expiresOn": ...} or {"ok": false, "error": "<error text>"}.
const { WorkloadIdentityCredential } = require("@azure/identity");

const scope = process.argv[2] || "https://vault.azure.net/.default";
new WorkloadIdentityCredential({ enableAzureProxy: true })
  .getToken(scope)
  .then((t) => console.log(JSON.stringify({ ok: true, token: t.token, expiresOn: t.expiresOnTimestamp })))
  .catch((e) => console.log(JSON.stringify({ ok: false, error: `${e.name}: ${e.message}` })));
