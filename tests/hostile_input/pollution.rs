//! Parameter pollution: a field given twice, and body and query never merged.

use super::common::raw_post;
use super::{form, form_body, on_shared_dev, refused, with, Cases, Send};

#[test]
fn repeated_or_split_parameters_are_refused() {
    on_shared_dev("parameter pollution", |ctx| async move {
        let (good, host) = (&ctx.good, &ctx.host);
        let mut cases = Cases::default();
        for field in [
            "client_id",
            "client_assertion",
            "scope",
            "grant_type",
            "client_assertion_type",
        ] {
            let mut p = good.clone();
            let value = p.iter().find(|(k, _)| k == field).unwrap().1.clone();
            p.push((field.to_string(), value));
            cases.add(
                format!("{field} twice"),
                form(p),
                refused(
                    400,
                    "invalid_request",
                    format!("'{field}' was given more than once"),
                ),
            );
        }
        {
            let body = format!(
                "{}&client%5Fid=99999999-8888-7777-6666-555555555555",
                form_body(good)
            );
            cases.add(
                "client_id twice, once percent-encoded",
                Send::Raw(raw_post("HTTP/1.1", "/", host, &body), 1),
                refused(
                    400,
                    "invalid_request",
                    "'client_id' was given more than once",
                ),
            );
        }
        {
            // Body and query are never merged: the body's missing scope is not taken from the
            // query.
            let q = form_body(good);
            let body = form_body(&with(good, "scope", None));
            cases.add(
                "scope only in the query beside a body",
                Send::Raw(raw_post("HTTP/1.1", &format!("/?{q}"), host, &body), 1),
                refused(400, "invalid_request", "'scope'"),
            );
        }
        ctx.run(7, cases).await;
    });
}
