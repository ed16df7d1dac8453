//! Methods and paths: only POST on the token path, and a 405 names the method allowed.

use bytes::Bytes;
use http_body_util::Full;

use super::{form_body, on_shared_dev, refused, Cases, Send};

#[test]
fn other_methods_and_paths_are_refused() {
    on_shared_dev("methods and paths", |ctx| async move {
        let (tenant, token_path) = (&ctx.tenant, &ctx.token_path);
        let mut cases = Cases::default();
        for m in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            cases.add(
                format!("{m} on the token path"),
                Send::Request(
                    http::Request::builder()
                        .method(m)
                        .uri(token_path)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                ),
                refused(405, "invalid_request", format!("{m} is not allowed")),
            );
        }
        cases.add(
            "PUT on the root path",
            Send::Request(
                http::Request::put("/")
                    .body(Full::new(Bytes::from(form_body(&ctx.good))))
                    .unwrap(),
            ),
            refused(404, "invalid_request", "is not served here"),
        );
        cases.add(
            "POST on the discovery path",
            Send::Request(
                http::Request::post(format!("/{tenant}/v2.0/.well-known/openid-configuration"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
            refused(405, "invalid_request", "POST is not allowed"),
        );
        ctx.run(7, cases).await;

        // A 405 names the method that is allowed (RFC 9110).
        let r = ctx
            .client
            .send(
                http::Request::get(token_path)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 405, "{}", ctx.label("405 names POST"));
        assert_eq!(
            r.headers.get("allow").map(|v| v.to_str().unwrap()),
            Some("POST"),
            "{}",
            ctx.label("405 names POST")
        );
    });
}
