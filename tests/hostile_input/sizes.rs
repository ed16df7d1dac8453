//! Sizes: the assertion limit, and the body limit (`serve --max-body-bytes`) with and without
//! Content-Length.

use super::common::{raw_post, serve_default};
use super::{form, form_body, on_shared_dev, refused, with, Cases, Expect, Send};

/// `body` in chunks of `size`, as a chunked POST to `path`.
fn chunked_post(path: &str, host: &str, body: &str, size: usize) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.as_bytes().chunks(size) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

#[test]
fn oversized_tokens_and_bodies_are_refused() {
    on_shared_dev("sizes", |ctx| async move {
        let (good, host, token_path) = (&ctx.good, &ctx.host, &ctx.token_path);
        let max_body: usize = serve_default("max-body-bytes")
            .parse()
            .expect("--max-body-bytes is a number");
        let too_large = format!("larger than {max_body} bytes");
        let mut cases = Cases::default();
        let parts: Vec<&str> = ctx.good_token.split('.').collect();
        let big = format!("{}.{}.{}", parts[0], "A".repeat(17 * 1024), parts[2]);
        assert!(
            form_body(&ctx.assertion(&big)).len() < max_body,
            "the 17 KiB token's form must fit in --max-body-bytes ({max_body})"
        );
        cases.add(
            "17 KiB token (over the assertion limit, under the body limit)",
            form(ctx.assertion(&big)),
            refused(401, "invalid_client", "more than the 16384 accepted"),
        );
        let mib = "A".repeat(1024 * 1024);
        cases.add(
            "1 MiB token in the body",
            Send::Raw(
                raw_post("HTTP/1.1", "/", host, &form_body(&ctx.assertion(&mib))),
                1,
            ),
            refused(400, "invalid_request", too_large.as_str()),
        );
        cases.add(
            "1 MiB token in the query string",
            Send::Raw(
                format!(
                    "POST /?client_assertion={mib} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
                )
                .into_bytes(),
                1,
            ),
            Expect::Transport(431),
        );
        let padded = form_body(&with(good, "padding", Some(&"x".repeat(70 * 1024))));
        assert!(
            padded.len() > max_body,
            "the padded form must exceed --max-body-bytes ({max_body})"
        );
        cases.add(
            "body over the limit with Content-Length",
            Send::Raw(raw_post("HTTP/1.1", "/", host, &padded), 1),
            refused(400, "invalid_request", too_large.as_str()),
        );
        cases.add(
            "chunked body over the limit",
            Send::Raw(chunked_post(token_path, host, &padded, 4096), 1),
            refused(400, "invalid_request", too_large.as_str()),
        );
        cases.add(
            "positive control: chunked body",
            Send::Raw(chunked_post(token_path, host, &form_body(good), 100), 1),
            Expect::Served,
        );
        ctx.run(6, cases).await;
    });
}
