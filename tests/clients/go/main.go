// Gets tokens through identity-binding-proxy with the official Go SDK (azidentity) in proxy
// mode, reading the AZURE_* environment as a pod would.
//
// One request per line of stdin, one JSON line per request on stdout:
//
//	get <scope>    the credential built at start (so the SDK's own CA-file handling is used)
//	fresh <scope>  a new credential (so the SDK's in-memory token cache is not)
//
// {"ok": true, "token": ..., "expires_on": <unix secs>} or {"ok": false, "error": "<text>"}.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

func newCredential() (*azidentity.WorkloadIdentityCredential, error) {
	return azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{
		EnableAzureProxy: true,
	})
}

func getToken(cred *azidentity.WorkloadIdentityCredential, scope string) map[string]any {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tk, err := cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{scope}})
	if err != nil {
		return map[string]any{"ok": false, "error": err.Error()}
	}
	return map[string]any{"ok": true, "token": tk.Token, "expires_on": tk.ExpiresOn.Unix()}
}

func main() {
	out := json.NewEncoder(os.Stdout)
	cred, err := newCredential()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		mode, scope, _ := strings.Cut(strings.TrimSpace(in.Text()), " ")
		var reply map[string]any
		switch {
		case err != nil:
			reply = map[string]any{"ok": false, "error": err.Error()}
		case mode == "get":
			reply = getToken(cred, scope)
		case mode == "fresh":
			if c, e := newCredential(); e != nil {
				reply = map[string]any{"ok": false, "error": e.Error()}
			} else {
				reply = getToken(c, scope)
			}
		default:
			reply = map[string]any{"ok": false, "error": fmt.Sprintf("unknown command %q", mode)}
		}
		if e := out.Encode(reply); e != nil {
			os.Exit(1)
		}
	}
}
