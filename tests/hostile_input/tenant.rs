//! Tenant in the path: only the tenant the proxy is bound to.

use super::{on_shared_dev, refused, Cases, Send};

#[test]
fn other_tenants_in_the_path_are_refused() {
    on_shared_dev("tenant in the path", |ctx| async move {
        let tenant = &ctx.tenant;
        let mut cases = Cases::default();
        for (what, t) in [
            (
                "another tenant in the path",
                "00000000-0000-0000-0000-000000000001",
            ),
            ("organizations in the path", "organizations"),
            ("encoded traversal as the tenant", "..%2F..%2Fetc"),
            ("a domain-shaped tenant in the path", "evil.example.com"),
            (
                "a look-alike onmicrosoft domain in the path",
                "contoso.onmicrosoft.com",
            ),
        ] {
            cases.add(
                what,
                Send::Form(format!("/{t}/oauth2/v2.0/token"), ctx.good.clone()),
                refused(
                    400,
                    "invalid_request",
                    format!("bound to tenant '{tenant}'"),
                ),
            );
        }
        ctx.run(5, cases).await;
    });
}
