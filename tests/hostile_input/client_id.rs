//! client_id: malformed, missing, unknown; and a caller without a grant.

use super::{form, on_shared_dev, refused, with, Cases};

#[test]
fn malformed_unknown_or_ungranted_client_ids_are_refused() {
    on_shared_dev("client_id", |ctx| async move {
        let (good, cid) = (&ctx.good, &ctx.cid);
        let mut cases = Cases::default();
        for (what, v) in [
            ("client_id *", "*".to_string()),
            ("client_id ../", "../".into()),
            ("client_id ../../etc/passwd", "../../etc/passwd".into()),
            ("client_id empty", String::new()),
            ("client_id 10 KB", "a".repeat(10 * 1024)),
            ("client_id GUID in braces", format!("{{{cid}}}")),
            ("client_id GUID with a NUL", format!("{}\0", &cid[..35])),
            (
                "client_id fullwidth digits",
                "１１１１１１１１-2222-3333-4444-555555555555".into(),
            ),
            ("client_id with CR/LF", format!("{}\r\n", &cid[..34])),
        ] {
            cases.add(
                what,
                form(with(good, "client_id", Some(&v))),
                refused(400, "invalid_request", "is not a GUID"),
            );
        }
        cases.add(
            "client_id missing",
            form(with(good, "client_id", None)),
            refused(400, "invalid_request", "'client_id'"),
        );
        cases.add(
            "client_id neither granted nor bound (refused before the bindings are read)",
            form(with(
                good,
                "client_id",
                Some("99999999-8888-7777-6666-555555555555"),
            )),
            refused(
                403,
                "unauthorized_client",
                "is not allowed to use managed identity '99999999-8888-7777-6666-555555555555'",
            ),
        );
        cases.add(
            "service account without a grant",
            form(ctx.assertion(&ctx.denied_token)),
            refused(403, "unauthorized_client", "use-managed-identity"),
        );
        ctx.run(12, cases).await;
    });
}
