// Gets tokens through identity-binding-proxy with the official Node SDK (@azure/identity) in
// proxy mode, reading the AZURE_* environment as a pod would.
//
// One request per line of stdin, one JSON line per request on stdout:
//   get <scope>    the credential built at start (so the SDK's own CA-file handling is used)
//   fresh <scope>  a new credential (so the SDK's in-memory token cache is not)
// {"ok": true, "token": ..., "expires_on": <unix secs>} or {"ok": false, "error": "<text>"}.
const readline = require("node:readline");
const { WorkloadIdentityCredential } = require("@azure/identity");

const newCredential = () => new WorkloadIdentityCredential({ enableAzureProxy: true });
const failure = (e) => ({ ok: false, error: `${e.name}: ${e.message}` });

async function get(credential, scope) {
  try {
    const t = await credential.getToken(scope);
    return { ok: true, token: t.token, expires_on: Math.floor(t.expiresOnTimestamp / 1000) };
  } catch (e) {
    return failure(e);
  }
}

async function main() {
  let shared, sharedError;
  try {
    shared = newCredential();
  } catch (e) {
    sharedError = failure(e);
  }
  // One request at a time, in order.
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const [mode, scope] = line.trim().split(" ", 2);
    let reply;
    if (mode === "get") {
      reply = shared ? await get(shared, scope) : sharedError;
    } else if (mode === "fresh") {
      try {
        reply = await get(newCredential(), scope);
      } catch (e) {
        reply = failure(e);
      }
    } else {
      reply = { ok: false, error: `unknown command ${mode}` };
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
  }
}

main();
