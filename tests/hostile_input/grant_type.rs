//! grant and assertion type: unsupported, missing, blank.

use super::{form, on_shared_dev, refused, with, Cases};

#[test]
fn other_grants_and_assertion_types_are_refused() {
    on_shared_dev("grant and assertion type", |ctx| async move {
        let mut cases = Cases::default();
        for (what, field, value, status, error, needle) in [
            (
                "grant_type password",
                "grant_type",
                Some("password"),
                400,
                "unsupported_grant_type",
                "'password' is not supported",
            ),
            (
                "grant_type with a trailing space",
                "grant_type",
                Some("client_credentials "),
                400,
                "unsupported_grant_type",
                "is not supported",
            ),
            (
                "grant_type missing",
                "grant_type",
                None,
                400,
                "invalid_request",
                "'grant_type'",
            ),
            (
                "assertion type saml",
                "client_assertion_type",
                Some("urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
                400,
                "invalid_request",
                "is not supported",
            ),
            (
                "assertion type missing",
                "client_assertion_type",
                None,
                400,
                "invalid_request",
                "'client_assertion_type'",
            ),
            (
                "assertion missing",
                "client_assertion",
                None,
                400,
                "invalid_request",
                "'client_assertion'",
            ),
            (
                "assertion only white space",
                "client_assertion",
                Some(" \n\t "),
                400,
                "invalid_request",
                "'client_assertion'",
            ),
        ] {
            cases.add(
                what,
                form(with(&ctx.good, field, value)),
                refused(status, error, needle),
            );
        }
        ctx.run(7, cases).await;
    });
}
