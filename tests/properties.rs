//! Properties of the pure request-parsing code, checked on generated input in every CI run
//! (the fuzzers in `fuzz/` explore the same functions for longer, off CI).

use http::Method;
use identity_binding_proxy::authn::pre_parse_header;
use identity_binding_proxy::http::form::form_encode;
use identity_binding_proxy::request::token::{self, Route, ASSERTION_TYPE_JWT};
use proptest::prelude::*;

const CID: &str = "11111111-2222-3333-4444-555555555555";

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::POST),
        Just(Method::GET),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
    ]
}

/// Paths built from the segments the router looks for, plus noise.
fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("oauth2".to_string()),
        Just("v2.0".to_string()),
        Just("token".to_string()),
        Just(".well-known".to_string()),
        Just("openid-configuration".to_string()),
        Just("..".to_string()),
        Just(String::new()),
        "[a-zA-Z0-9%._~-]{0,12}",
        any::<String>(),
    ];
    prop::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_router_and_parser_never_panic(
        m in method(),
        p in path(),
        query in proptest::option::of(any::<String>()),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Route::Token { tenant } = token::route(&m, &p) {
            match token::parse(tenant, query.as_deref(), &body) {
                Ok(req) => {
                    prop_assert_eq!(token::parse_guid(&req.client_id), Some(req.client_id.clone()));
                    prop_assert!(!req.assertion.is_empty());
                }
                Err(e) => prop_assert!(e.status().is_client_error()),
            }
        }
    }

    #[test]
    fn form_shaped_bodies_parse_or_refuse_with_a_4xx(
        fields in prop::collection::vec(
            (prop_oneof![
                Just("grant_type"), Just("client_id"), Just("scope"),
                Just("client_assertion_type"), Just("client_assertion"), Just("claims"),
                Just("x-client-SKU"),
            ], any::<String>()),
            0..10,
        ),
    ) {
        let body = form_encode(fields.iter().map(|(k, v)| (*k, v.as_str())));
        if let Err(e) = token::parse(None, None, body.as_bytes()) {
            prop_assert!(e.status().is_client_error());
            let d = e.body("c").error_description;
            prop_assert!(!d.contains('\n') && !d.contains('\r'), "{}", d);
        }
    }

    #[test]
    fn any_assertion_survives_the_form_and_comes_back_trimmed(
        assertion in "[ \t\n]{0,2}[!-~]{1,200}[ \t\r\n]{0,2}",
        scope_case in any::<bool>(),
    ) {
        let scope = if scope_case { "HTTPS://Vault.Azure.NET/.default" } else { "https://vault.azure.net/.default" };
        let body = form_encode([
            ("grant_type", "client_credentials"),
            ("client_id", CID),
            ("scope", scope),
            ("client_assertion_type", ASSERTION_TYPE_JWT),
            ("client_assertion", assertion.as_str()),
        ]);
        let req = token::parse(None, None, body.as_bytes()).unwrap();
        prop_assert_eq!(req.assertion.as_str(), assertion.trim());
        prop_assert_eq!(req.scope.as_str(), "https://vault.azure.net/.default");
        // The same form in the query with an empty body parses the same.
        let from_query = token::parse(None, Some(&body), b"").unwrap();
        prop_assert_eq!(from_query, req);
    }

    #[test]
    fn the_jwt_pre_parser_accepts_only_asymmetric_algorithms(
        alg in prop_oneof![
            Just("RS256".to_string()), Just("ES256".to_string()), Just("none".to_string()),
            Just("HS256".to_string()), Just("HS512".to_string()), any::<String>(),
        ],
        kid in proptest::option::of(any::<String>()),
        rest in any::<String>(),
    ) {
        use base64::Engine;
        let mut header = serde_json::json!({"alg": alg});
        if let Some(kid) = &kid {
            header["kid"] = serde_json::json!(kid);
        }
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&header).unwrap());
        let token = format!("{h}.e30.{rest}");
        match pre_parse_header(&token) {
            Ok(parsed) => {
                let name = format!("{:?}", parsed.alg);
                prop_assert!(["RS", "PS", "ES"].iter().any(|p| name.starts_with(p)), "{}", name);
                prop_assert_eq!(parsed.kid, kid);
            }
            Err(e) => prop_assert_eq!(e.status(), 401),
        }
    }

    #[test]
    fn the_jwt_pre_parser_never_panics(token in any::<String>()) {
        if let Err(e) = pre_parse_header(&token) {
            prop_assert_eq!(e.status(), 401);
        }
    }

    #[test]
    fn printable_strips_controls_and_bounds_length(s in any::<String>(), max in 0usize..64) {
        let p = token::printable(&s, max);
        prop_assert!(!p.chars().any(char::is_control));
        prop_assert!(p.chars().count() <= max + 1);
    }

    /// The canonical scope string is a fixed point (canonical of canonical is itself), and
    /// every spelling that differs only in host case, `/.default` case, order, repetition or
    /// ASCII white space maps to it.
    #[test]
    fn scope_spellings_share_one_canonical_form(
        hosts in proptest::collection::vec("[a-z][a-z0-9-]{0,10}\\.(net|com)", 1..4),
        upper in proptest::collection::vec(any::<bool>(), 8),
        spaces in proptest::collection::vec("[ \t\r\n]{1,3}", 8),
        repeat in 1usize..3,
    ) {
        let plain: Vec<String> = hosts.iter().map(|h| format!("https://{h}/.default")).collect();
        let canonical = token::canonical_scopes(&plain.join(" ")).unwrap();
        prop_assert_eq!(token::canonical_scopes(&canonical).unwrap(), canonical.clone());
        let mut spelled = String::from(spaces[7].as_str());
        for (i, scope) in plain.iter().rev().cycle().take(plain.len() * repeat).enumerate() {
            let s = if upper[i % 8] { scope.to_ascii_uppercase() } else { scope.clone() };
            spelled.push_str(&s);
            spelled.push_str(&spaces[i % 7]);
        }
        prop_assert_eq!(token::canonical_scopes(&spelled).unwrap(), canonical);
    }

    /// No scope parameter panics the parser, and whatever it accepts is plain printable
    /// ASCII that it accepts again unchanged.
    #[test]
    fn any_scope_is_refused_or_canonical(scope in any::<String>()) {
        match token::canonical_scopes(&scope) {
            Ok(c) => {
                prop_assert!(c.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' '));
                prop_assert_eq!(token::canonical_scopes(&c).unwrap(), c);
            }
            Err(e) => prop_assert_eq!(e.status(), 400),
        }
    }

    /// No answer Entra gives can panic the proxy: any body is a token with a lifetime within
    /// (0, 24 h] or a 502.
    #[test]
    fn no_entra_answer_panics_or_escapes_the_lifetime_bounds(
        expires in prop_oneof![any::<u64>().prop_map(|n| n.to_string()), any::<i64>().prop_map(|n| n.to_string()), Just("\"3599\"".to_string()), Just("1e308".to_string()), Just("null".to_string())],
        ext in prop_oneof![any::<u64>().prop_map(|n| n.to_string()), Just("\"x\"".to_string())],
        refresh in proptest::option::of(any::<u64>()),
        token in "[!-~]{0,40}",
        junk in any::<String>(),
    ) {
        use identity_binding_proxy::exchange::cache::MAX_LIFETIME_SECS;
        use identity_binding_proxy::exchange::entra::parse_token;
        let refresh = refresh.map(|r| format!(",\"refresh_in\":{r}")).unwrap_or_default();
        let body = format!(
            "{{\"token_type\":\"Bearer\",\"access_token\":{},\"expires_in\":{expires},\"ext_expires_in\":{ext}{refresh}}}",
            serde_json::Value::from(token.clone())
        );
        let now = std::time::Instant::now();
        for b in [body.as_bytes(), junk.as_bytes()] {
            match parse_token(b, now) {
                Ok(t) => {
                    prop_assert!(t.expires_in > 0 && t.expires_in <= MAX_LIFETIME_SECS);
                    prop_assert!(t.ext_expires_in <= MAX_LIFETIME_SECS);
                    prop_assert!(t.refresh_in.is_none_or(|r| r <= t.expires_in));
                    prop_assert!(t.remaining() <= std::time::Duration::from_secs(MAX_LIFETIME_SECS));
                    let _ = t.expires_at();
                }
                Err(e) => prop_assert_eq!(e.status(), 502),
            }
        }
    }
}
