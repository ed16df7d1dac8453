//! HTTP/1.0, pipelining, framing: old and unusual framings are served or refused by the HTTP
//! layer; smuggling-shaped ones never reach the handler.

use super::common::raw_post;
use super::{form_body, on_shared_dev, refused, with, Cases, Expect, Send};

#[test]
fn http1_framings_are_served_in_order_or_refused_before_the_handler() {
    on_shared_dev("HTTP/1.0, pipelining, framing", |ctx| async move {
        let (good, host, token_path) = (&ctx.good, &ctx.host, &ctx.token_path);
        let body = form_body(good);
        let mut cases = Cases::default();
        cases.add(
            "positive control: HTTP/1.0",
            Send::Raw(raw_post("HTTP/1.0", token_path, host, &body), 1),
            Expect::Served,
        );
        cases.add(
            "HTTP/1.0 with a denied token",
            Send::Raw(
                raw_post(
                    "HTTP/1.0",
                    token_path,
                    host,
                    &form_body(&ctx.assertion(&ctx.denied_token)),
                ),
                1,
            ),
            refused(403, "unauthorized_client", "demo/intruder"),
        );
        {
            let mut raw = raw_post(
                "HTTP/1.1",
                token_path,
                host,
                &form_body(&with(good, "scope", None)),
            );
            raw.extend(raw_post(
                "HTTP/1.1",
                token_path,
                host,
                &form_body(&ctx.assertion(&ctx.denied_token)),
            ));
            raw.extend(raw_post("HTTP/1.1", token_path, host, &body));
            cases.add_answers(
                "three pipelined requests answered in order",
                Send::Raw(raw, 3),
                vec![
                    refused(400, "invalid_request", "'scope'"),
                    refused(403, "unauthorized_client", "demo/intruder"),
                    Expect::Served,
                ],
            );
        }
        cases.add(
            "Content-Length and Transfer-Encoding together (smuggling)",
            Send::Raw(
                format!(
                    "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                )
                .into_bytes(),
                1,
            ),
            Expect::Transport(400),
        );
        cases.add(
            "two different Content-Length headers",
            Send::Raw(
                format!(
                    "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
                )
                .into_bytes(),
                1,
            ),
            Expect::Transport(400),
        );
        cases.add(
            "bare LF in the request head",
            Send::Raw(
                format!(
                    "POST / HTTP/1.1\r\nHost: {host}\r\nX-A: b\nc\r\nContent-Length: 0\r\n\r\n"
                )
                .into_bytes(),
                1,
            ),
            Expect::Transport(400),
        );
        cases.add(
            "200 headers",
            Send::Raw(
                format!(
                    "POST / HTTP/1.1\r\nHost: {host}\r\n{}Content-Length: 0\r\n\r\n",
                    (0..200)
                        .map(|i| format!("X-H{i}: v\r\n"))
                        .collect::<String>()
                )
                .into_bytes(),
                1,
            ),
            Expect::Transport(431),
        );
        ctx.run(9, cases).await;
    });
}
