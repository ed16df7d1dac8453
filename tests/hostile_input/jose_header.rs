//! The JOSE header: algorithms and key ids.

use identity_binding_proxy::exchange::keys::SigningKey;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use super::{b64, form, on_shared_dev, refused, sign_with, Cases};

#[test]
fn forged_algorithms_and_key_ids_are_refused() {
    on_shared_dev("JOSE header", |ctx| async move {
        let forge = ctx.forge;
        let mut cases = Cases::default();
        let claims = forge.claims("demo");
        let payload = b64(&claims);
        for alg in ["none", "None", "NONE", ""] {
            let t = format!("{}.{payload}.", b64(&json!({"alg": alg, "typ": "JWT"})));
            cases.add(
                format!("alg {alg:?}"),
                form(ctx.assertion(&t)),
                refused(401, "invalid_client", format!("'{alg}' is refused")),
            );
        }
        let public_pem = forge.key.public().to_pem();
        let public_jwk = serde_json::to_vec(&forge.key.public().jwk()).unwrap();
        for (alg, secret, what) in [
            (
                Algorithm::HS256,
                public_pem.as_bytes().to_vec(),
                "HS256 keyed with the public PEM",
            ),
            (
                Algorithm::HS256,
                public_jwk,
                "HS256 keyed with the public JWK",
            ),
            (
                Algorithm::HS512,
                public_pem.as_bytes().to_vec(),
                "HS512 keyed with the public PEM",
            ),
        ] {
            let name = format!("{alg:?}");
            let t = sign_with(
                json!({"alg": name, "typ": "JWT", "kid": forge.key.kid()}),
                &claims,
                &EncodingKey::from_secret(&secret).unwrap(),
                alg,
            );
            cases.add(
                what,
                form(ctx.assertion(&t)),
                refused(401, "invalid_client", format!("'{name}' is refused")),
            );
        }
        // An HMAC signature under a header that claims RS256: the signature check catches it.
        let hmac_as_rs = {
            let input = format!("{}.{payload}", b64(&forge.header()));
            let sig = jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(public_pem.as_bytes()).unwrap(),
                Algorithm::HS256,
            )
            .unwrap();
            format!("{input}.{sig}")
        };
        cases.add(
            "RS256 header over an HMAC signature",
            form(ctx.assertion(&hmac_as_rs)),
            refused(401, "invalid_client", "signature is not valid"),
        );
        let unknown_kid =
            forge.sign_rs256(json!({"alg": "RS256", "kid": "not-a-key-we-know"}), &claims);
        cases.add(
            "unknown kid",
            form(ctx.assertion(&unknown_kid)),
            refused(401, "invalid_client", "'not-a-key-we-know'"),
        );
        for kid in [
            "../../../etc/passwd",
            "/openid/v1/jwks?x=",
            "a\r\nX-Injected: 1",
            "%2e%2e%2f",
        ] {
            let t = forge.sign_rs256(json!({"alg": "RS256", "kid": kid}), &claims);
            cases.add(
                format!("kid {kid:?}"),
                form(ctx.assertion(&t)),
                refused(401, "invalid_client", "does not publish"),
            );
        }
        let no_kid = forge.sign_rs256(json!({"alg": "RS256", "typ": "JWT"}), &claims);
        cases.add(
            "no kid",
            form(ctx.assertion(&no_kid)),
            refused(401, "invalid_client", "names no signing key"),
        );
        let es_header = forge.sign_rs256(json!({"alg": "ES256", "kid": forge.key.kid()}), &claims);
        cases.add(
            "ES256 header with the cluster's RSA kid",
            form(ctx.assertion(&es_header)),
            refused(401, "invalid_client", "'ES256'"),
        );
        let attacker = SigningKey::generate(2048).unwrap();
        let attacker_enc = EncodingKey::from_rsa_pem(attacker.private_pem().as_bytes()).unwrap();
        let t = sign_with(forge.header(), &claims, &attacker_enc, Algorithm::RS256);
        cases.add(
            "the cluster's kid over another key's signature",
            form(ctx.assertion(&t)),
            refused(401, "invalid_client", "signature is not valid"),
        );
        let t = sign_with(
            json!({"alg": "RS256", "kid": attacker.kid(), "jku": "http://127.0.0.1:1/jwks", "jwk": attacker.public().jwk()}),
            &claims,
            &attacker_enc,
            Algorithm::RS256,
        );
        cases.add(
            "embedded jwk and jku are never trusted",
            form(ctx.assertion(&t)),
            refused(401, "invalid_client", "does not publish"),
        );
        ctx.run(17, cases).await;
    });
}
