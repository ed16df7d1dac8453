//! The token request's HTTP surface on arbitrary input: method, path, query, content type
//! and body go through `token::route`, `token::check_content_type` and `token::parse`.
//! Every input must produce a route and either a request or a 4xx refusal, never a panic.
#![no_main]

use http::Method;
use identity_binding_proxy::request::token::{self, Route};
use libfuzzer_sys::fuzz_target;

const METHODS: [Method; 5] = [
    Method::POST,
    Method::GET,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // Layout: selector byte, then path \0 query \0 content-type \0 body.
    let mut parts = rest.splitn(4, |b| *b == 0);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = parts.next().map(String::from_utf8_lossy);
    let content_type = parts.next().map(String::from_utf8_lossy);
    let body = parts.next().unwrap_or_default();
    let method = &METHODS[usize::from(selector) % METHODS.len()];

    let tenant = match token::route(method, &path) {
        Route::Token { tenant } => tenant,
        Route::Discovery { tenant, prefix } => {
            let doc = token::discovery_document(&format!("https://h{prefix}"), &tenant);
            assert!(doc["token_endpoint"].is_string());
            return;
        }
        Route::NotFound => {
            let _ = token::not_found(method, &path).body("c");
            return;
        }
        Route::MethodNotAllowed => {
            let _ = token::method_not_allowed(method).body("c");
            return;
        }
    };
    let _ = token::check_content_type(content_type.as_deref());
    match token::parse(tenant, query.as_deref(), body) {
        Ok(req) => {
            assert_eq!(token::parse_guid(&req.client_id).as_deref(), Some(&*req.client_id));
            assert!(!req.assertion.is_empty());
            assert!(req.assertion.len() <= token::MAX_ASSERTION_BYTES);
            assert!(req.scope_key.split(' ').all(|s| s.ends_with("/.default")));
        }
        Err(e) => {
            assert!(e.status().is_client_error(), "{e:?}");
            let body = e.body("c");
            assert!(!body.error_description.is_empty());
            assert!(!body.error_description.contains('\r'));
            assert!(!body.error_description.contains('\n'));
        }
    }
});
