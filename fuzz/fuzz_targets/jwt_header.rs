//! The JWT pre-parser that runs before any signature check, on arbitrary tokens: it must
//! refuse everything but asymmetric algorithms, with a 401, and never panic.
#![no_main]

use identity_binding_proxy::authn::pre_parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    match pre_parse_header(&token) {
        Ok(header) => {
            let name = format!("{:?}", header.alg);
            assert!(
                name.starts_with("RS") || name.starts_with("PS") || name.starts_with("ES"),
                "accepted {name}"
            );
        }
        Err(e) => {
            assert_eq!(e.status(), 401, "{e:?}");
            let body = e.body("c");
            assert!(!body.error_description.contains('\n'));
        }
    }
});
