//! Signature and structure: tampered, stripped and malformed tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use super::{b64, form, on_shared_dev, refused, Cases};

#[test]
fn tampered_and_malformed_tokens_are_refused() {
    on_shared_dev("signature and structure", |ctx| async move {
        let forge = ctx.forge;
        let good_token = &ctx.good_token;
        let mut cases = Cases::default();
        let claims = forge.claims("demo");
        let mut tampered = claims.clone();
        tampered["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
        tampered["sub"] = json!("system:serviceaccount:demo:admin");
        let parts: Vec<&str> = good_token.split('.').collect();
        cases.add(
            "payload swapped under a valid signature",
            form(ctx.assertion(&format!("{}.{}.{}", parts[0], b64(&tampered), parts[2]))),
            refused(401, "invalid_client", "signature is not valid"),
        );
        cases.add(
            "signature stripped",
            form(ctx.assertion(&format!("{}.{}.", parts[0], parts[1]))),
            refused(401, "invalid_client", "signature is not valid"),
        );
        for (what, t) in [
            (
                "broken base64 in the header",
                format!("!!!.{}.{}", parts[1], parts[2]),
            ),
            (
                "header is not JSON",
                format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode("{alg:"),
                    parts[1],
                    parts[2]
                ),
            ),
            (
                "header is not UTF-8",
                format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x7b]),
                    parts[1],
                    parts[2]
                ),
            ),
            ("two segments", format!("{}.{}", parts[0], parts[1])),
            ("four segments", format!("{good_token}.x")),
            ("a JWE (five segments)", format!("{}.a.b.c.d", parts[0])),
            ("not a token at all", "hello".into()),
        ] {
            cases.add(
                what,
                form(ctx.assertion(&t)),
                refused(401, "invalid_client", "not a JWT"),
            );
        }
        // Payloads that are validly signed by the cluster key but cannot be read.
        let signed_raw = |payload: &str| {
            let input = format!("{}.{payload}", b64(&forge.header()));
            let key = EncodingKey::from_rsa_pem(forge.pem.as_bytes()).unwrap();
            let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap();
            format!("{input}.{sig}")
        };
        for (what, t) in [
            ("broken base64 in the payload", signed_raw("!!!")),
            (
                "payload is not JSON",
                forge.sign_rs256(forge.header(), &json!("just a string")),
            ),
            (
                "payload is not UTF-8",
                signed_raw(&URL_SAFE_NO_PAD.encode([0xc3, 0x28])),
            ),
        ] {
            cases.add(
                what,
                form(ctx.assertion(&t)),
                refused(401, "invalid_client", "could not be read"),
            );
        }
        ctx.run(12, cases).await;
    });
}
