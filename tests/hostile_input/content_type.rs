//! Content type and encoding: only an urlencoded form, in UTF-8.

use bytes::Bytes;
use http_body_util::Full;

use super::{form_body, on_shared_dev, refused, Cases, Send};

#[test]
fn bodies_that_are_not_an_utf8_form_are_refused() {
    on_shared_dev("content type and encoding", |ctx| async move {
        let host = &ctx.host;
        let mut cases = Cases::default();
        let body = form_body(&ctx.good);
        for (what, ct, needle) in [
            (
                "JSON content type",
                Some("application/json"),
                "'application/json' is not supported",
            ),
            (
                "multipart content type",
                Some("multipart/form-data; boundary=x"),
                "'multipart/form-data' is not supported",
            ),
            (
                "text/plain content type",
                Some("text/plain"),
                "'text/plain' is not supported",
            ),
            ("no content type", None, "no Content-Type"),
        ] {
            let mut b = http::Request::post("/");
            if let Some(ct) = ct {
                b = b.header("content-type", ct);
            }
            cases.add(
                what,
                Send::Request(b.body(Full::new(Bytes::from(body.clone()))).unwrap()),
                refused(400, "invalid_request", needle),
            );
        }
        {
            let mut raw_body = body.clone().into_bytes();
            raw_body.extend_from_slice(b"&x=\xff\xfe");
            let mut req = format!(
                "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
                raw_body.len()
            )
            .into_bytes();
            req.extend_from_slice(&raw_body);
            cases.add(
                "body is not UTF-8",
                Send::Raw(req, 1),
                refused(400, "invalid_request", "not valid UTF-8"),
            );
        }
        cases.add(
            "empty body and no query",
            Send::Request(
                http::Request::post("/")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
            refused(400, "invalid_request", "'grant_type'"),
        );
        ctx.run(6, cases).await;
    });
}
