//! Scopes: missing, too many, not `/.default`, and look-alike characters.

use super::{form, on_shared_dev, refused, with, Cases};

#[test]
fn scopes_that_are_not_one_resource_default_are_refused() {
    on_shared_dev("scopes", |ctx| async move {
        let mut cases = Cases::default();
        let hundred = (0..100)
            .map(|i| format!("https://r{i}.example/.default"))
            .collect::<Vec<_>>()
            .join(" ");
        for (what, value, status, error, needle) in [
            ("scope missing", None, 400, "invalid_request", "'scope'"),
            (
                "scope empty",
                Some("   "),
                400,
                "invalid_request",
                "'scope'",
            ),
            (
                "100 scopes",
                Some(hundred.as_str()),
                400,
                "invalid_scope",
                "More than 8 scopes were requested",
            ),
            (
                "delegated scope",
                Some("https://graph.microsoft.com/User.Read"),
                400,
                "invalid_scope",
                "is not a '<resource>/.default' scope",
            ),
            (
                "openid scope",
                Some("openid"),
                400,
                "invalid_scope",
                "'openid'",
            ),
            (
                "scope with CR/LF",
                Some("https://vault.azure.net/.default\r\nX: y"),
                400,
                "invalid_scope",
                "'X:'",
            ),
            (
                "scope led by a no-break space",
                Some("\u{a0}https://vault.azure.net/.default"),
                400,
                "invalid_scope",
                "U+00A0",
            ),
            (
                "scope with an em space inside",
                Some("https://vault.azure.net/.default\u{2003}https://vault.azure.net/.default"),
                400,
                "invalid_scope",
                "U+2003",
            ),
            (
                "scope with a Cyrillic letter in the host",
                Some("https://v\u{0430}ult.azure.net/.default"),
                400,
                "invalid_scope",
                "U+0430",
            ),
            (
                "scope with a NUL byte",
                Some("https://vault.azure.net/.default\u{0}"),
                400,
                "invalid_scope",
                "U+0000",
            ),
        ] {
            cases.add(
                what,
                form(with(&ctx.good, "scope", value)),
                refused(status, error, needle),
            );
        }
        ctx.run(10, cases).await;
    });
}
