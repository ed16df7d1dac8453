//! h2: many concurrent streams on one connection, good and denied interleaved.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;

use super::common::{token_form, Client};
use super::{check, on_shared_dev, refused, Expect};

#[test]
fn interleaved_good_and_denied_h2_streams_each_get_their_own_answer() {
    on_shared_dev("h2 streams", |ctx| async move {
        let info = &ctx.sys.info;
        let ca = std::fs::read(&info.ca_file).unwrap();
        let h2 = Client::new(ctx.sys.proxy.addr, &info.sni_name, &ca, &[b"h2"]);
        // Asserts that ALPN chose h2.
        let sender = h2.h2_sender().await;
        let streams = 400;
        let mut tasks = Vec::new();
        for i in 0..streams {
            let mut sender = sender.clone();
            let token = if i % 2 == 0 {
                ctx.good_token.clone()
            } else {
                ctx.denied_token.clone()
            };
            let body =
                identity_binding_proxy::http::form::form_encode(token_form(&ctx.cid, &token));
            let path = ctx.token_path.clone();
            tasks.push(tokio::spawn(async move {
                use http_body_util::BodyExt;
                let req = http::Request::post(path)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                let raw = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    i,
                    status,
                    serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null),
                    raw,
                )
            }));
        }
        for t in tasks {
            let (i, status, json, raw) = t.await.unwrap();
            if i % 2 == 0 {
                check(
                    &ctx.label(&format!("stream {i} (allowed)")),
                    status,
                    &json,
                    &raw,
                    &Expect::Served,
                );
            } else {
                check(
                    &ctx.label(&format!("stream {i} (denied)")),
                    status,
                    &json,
                    &raw,
                    &refused(403, "unauthorized_client", "demo/intruder"),
                );
            }
        }
        ctx.still_healthy().await;
        println!("{}: {streams} streams checked", ctx.section);
    });
}
