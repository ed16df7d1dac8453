//! Times: expired, not yet valid, missing or unreadable expiry.

use serde_json::json;

use super::common::mint_sa;
use super::{form, now, on_shared_dev, refused, Cases};

#[test]
fn tokens_outside_their_validity_are_refused() {
    on_shared_dev("times", |ctx| async move {
        let forge = ctx.forge;
        let mut cases = Cases::default();
        let claims = forge.claims("demo");
        cases.add(
            "expired",
            form(ctx.assertion(&mint_sa(ctx.sys, "demo", "demo", &[&ctx.aud], -3600))),
            refused(401, "invalid_client", "expired"),
        );
        let mut future = claims.clone();
        future["nbf"] = json!(now() + 3600);
        future["iat"] = json!(now() + 3600);
        future["exp"] = json!(now() + 7200);
        cases.add(
            "not yet valid",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &future))),
            refused(401, "invalid_client", "not valid yet"),
        );
        let mut no_exp = claims.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        cases.add(
            "missing exp",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &no_exp))),
            refused(401, "invalid_client", "'exp'"),
        );
        let mut string_exp = claims.clone();
        string_exp["exp"] = json!("tomorrow");
        cases.add(
            "exp is a string",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &string_exp))),
            refused(401, "invalid_client", "could not be read"),
        );
        ctx.run(4, cases).await;
    });
}
