//! JWTs signed with the test secret, and unique session ids.

use std::time::{SystemTime, UNIX_EPOCH};

use super::server::SECRET;

use serde_json::{json, Value};

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs arbitrary claims with HS256 and the given secret.
pub fn mint_with_secret(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// Signs arbitrary claims with HS256 and the test secret.
pub fn mint(claims: &Value) -> String {
    mint_with_secret(claims, SECRET)
}

/// A valid one-hour token for `sub` on session `sid` with `role`.
pub fn token(sub: &str, sid: &str, role: &str) -> String {
    mint(&json!({
        "sub": sub,
        "sid": sid,
        "role": role,
        "name": format!("Name of {sub}"),
        "exp": now_s() + 3600,
    }))
}

/// An admin token covering every session (sid "*"), for `GET /api/v2/sessions`.
pub fn admin_token(sub: &str) -> String {
    mint(&json!({
        "sub": sub,
        "sid": "*",
        "role": "admin",
        "name": format!("Name of {sub}"),
        "exp": now_s() + 3600,
    }))
}

/// A unique session id per call (tests share nothing, but unique ids make logs readable).
pub fn session_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
