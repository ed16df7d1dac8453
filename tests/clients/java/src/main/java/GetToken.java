// Gets tokens through identity-binding-proxy with the official Java SDK (azure-identity) in
// proxy mode, reading the AZURE_* environment as a pod would.
//
// One request per line of stdin, one JSON line per request on stdout:
//   get <scope>    the credential built at start (so the SDK's own CA-file handling is used)
//   fresh <scope>  a new credential (so the SDK's in-memory token cache is not)
// {"ok": true, "token": ..., "expires_on": <unix secs>} or {"ok": false, "error": "<text>"}.

import com.azure.core.credential.AccessToken;
import com.azure.core.credential.TokenRequestContext;
import com.azure.identity.WorkloadIdentityCredential;
import com.azure.identity.WorkloadIdentityCredentialBuilder;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

public final class GetToken {
    private static WorkloadIdentityCredential newCredential() {
        return new WorkloadIdentityCredentialBuilder().enableAzureProxy().build();
    }

    private static String get(WorkloadIdentityCredential cred, String scope) {
        try {
            AccessToken t = cred.getTokenSync(new TokenRequestContext().addScopes(scope));
            return "{\"ok\":true,\"token\":" + quote(t.getToken()) + ",\"expires_on\":"
                + t.getExpiresAt().toEpochSecond() + "}";
        } catch (Throwable e) {
            return error(e);
        }
    }

    private static String error(Throwable e) {
        // The whole chain: the text users would see in their logs.
        StringBuilder text = new StringBuilder();
        for (Throwable c = e; c != null; c = c.getCause()) {
            if (text.length() > 0) {
                text.append(" | caused by: ");
            }
            text.append(c.getClass().getName()).append(": ").append(c.getMessage());
        }
        return "{\"ok\":false,\"error\":" + quote(text.toString()) + "}";
    }

    private static String quote(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : String.valueOf(s).toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        WorkloadIdentityCredential shared = null;
        String sharedError = null;
        try {
            shared = newCredential();
        } catch (Throwable e) {
            sharedError = error(e);
        }
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String[] parts = line.trim().split(" ", 2);
            String scope = parts.length > 1 ? parts[1] : "";
            String reply;
            if (parts[0].equals("get")) {
                reply = shared != null ? get(shared, scope) : sharedError;
            } else if (parts[0].equals("fresh")) {
                try {
                    reply = get(newCredential(), scope);
                } catch (Throwable e) {
                    reply = error(e);
                }
            } else {
                reply = "{\"ok\":false,\"error\":" + quote("unknown command " + parts[0]) + "}";
            }
            System.out.println(reply);
            System.out.flush();
        }
        System.exit(0);
    }
}
