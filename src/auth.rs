//! Authentication: turning a bearer JWT into verified [`Claims`], and role checks.
//!
//! This module owns the key material and the validation rules of SPEC.md section 2: the
//! algorithm family is pinned by the configured key (an HMAC secret admits HS256/384/512
//! only, a public key only its own family, never `none`), `sub`, `exp` and `sid` are
//! required, `iss`/`aud` are checked when configured, `nbf` is honoured (with the same
//! leeway as `exp`), a header `crit` list is refused (RFC 7515 4.1.11: we understand no
//! extension), and HMAC secrets shorter than [`MIN_SECRET_BYTES`] are refused when the
//! verifier is built. It knows nothing of HTTP: extracting
//! the token from a request is the server's job, and the reason of a failure is returned,
//! never logged here (the caller logs it, without the token).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
pub use crate::config::MIN_SECRET_BYTES;

/// Why a token was refused. The `reason` strings are stable metric label values.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token in the request")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token header names critical extensions this server does not understand")]
    Critical,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed or lacks a required claim: {0}")]
    Malformed(String),
    #[error("token algorithm is not accepted")]
    WrongAlgorithm,
    #[error("token issuer or audience is not accepted")]
    WrongIssuerOrAudience,
    #[error("key configuration: {0}")]
    Key(String),
}

impl AuthError {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Critical => "crit",
            AuthError::BadSignature => "bad_signature",
            AuthError::Malformed(_) => "malformed",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::WrongIssuerOrAudience => "wrong_issuer_or_audience",
            AuthError::Key(_) => "key",
        }
    }
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidSignature => AuthError::BadSignature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::WrongAlgorithm,
            K::InvalidIssuer | K::InvalidAudience => AuthError::WrongIssuerOrAudience,
            K::MissingRequiredClaim(c) => AuthError::Malformed(format!("missing claim {c}")),
            // jsonwebtoken's own texts for these are its enum's names ("InvalidToken").
            K::InvalidToken => {
                AuthError::Malformed("not a JWT (three base64url parts joined by dots)".into())
            }
            K::Base64(_) | K::Utf8(_) => {
                AuthError::Malformed("a part of the token is not valid base64url".into())
            }
            K::Json(_) => AuthError::Malformed(
                "the token's header or claims are not the JSON expected".into(),
            ),
            _ => AuthError::Malformed(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Tutor,
    #[default]
    Student,
    Viewer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tutor => "tutor",
            Role::Student => "student",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    /// May change the whiteboard and post chat.
    pub fn can_write(self) -> bool {
        self != Role::Viewer
    }

    /// May take and restore snapshots.
    pub fn can_manage_snapshots(self) -> bool {
        matches!(self, Role::Tutor | Role::Admin)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tutor" => Ok(Role::Tutor),
            "student" => Ok(Role::Student),
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role {s:?} (tutor, student, viewer, admin)"
            )),
        }
    }
}

/// The `sid` claim: one session, several, or all of them (`"*"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionScope {
    One(String),
    Many(Vec<String>),
}

impl SessionScope {
    pub fn covers(&self, session: &str) -> bool {
        match self {
            SessionScope::One(s) => s == "*" || s == session,
            SessionScope::Many(list) => list.iter().any(|s| s == "*" || s == session),
        }
    }
}

/// The verified claims of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub sid: SessionScope,
    #[serde(default)]
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: RFC 7519 allows one string or a list (many identity providers issue a
/// list). Checked by the JWT library against `auth.audience` when that is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    /// The name shown to others: the `name` claim, else the user id.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.sub)
    }
}

/// Refuses an HMAC secret shorter than [`MIN_SECRET_BYTES`]; `source` names where it came
/// from (a config key, a variable, a file) so the operator knows what to change.
pub fn check_secret(secret: &[u8], source: &str) -> Result<(), AuthError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthError::Key(format!(
            "{source} is {} bytes long; HMAC secrets must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)",
            secret.len()
        )));
    }
    Ok(())
}

/// Verifies tokens with the configured key; cheap to share behind an `Arc`.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Present only for an HMAC secret: lets `easel token` and the demo URL mint tokens.
    signing: Option<(EncodingKey, Algorithm)>,
    leeway: u64,
}

impl Verifier {
    /// Builds a verifier from the configuration. `Ok(None)` when no key is configured:
    /// the caller decides whether to generate a development secret.
    pub fn from_config(cfg: &AuthConfig) -> Result<Option<Self>, AuthError> {
        if let Some(secret) = &cfg.jwt_secret {
            check_secret(secret.as_bytes(), "auth.jwt_secret (EASEL_JWT_SECRET)")?;
            return Ok(Some(Self::hmac(secret.as_bytes(), cfg)));
        }
        if let Some(path) = &cfg.jwt_secret_file {
            let secret = std::fs::read_to_string(path)
                .map_err(|e| AuthError::Key(format!("{}: {e}", path.display())))?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(AuthError::Key(format!("{} is empty", path.display())));
            }
            check_secret(
                secret.as_bytes(),
                &format!(
                    "auth.jwt_secret_file (EASEL_JWT_SECRET_FILE) {}",
                    path.display()
                ),
            )?;
            return Ok(Some(Self::hmac(secret.as_bytes(), cfg)));
        }
        if let Some(path) = &cfg.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| AuthError::Key(format!("{}: {e}", path.display())))?;
            let (key, family) = parse_public_key(&pem)
                .map_err(|e| AuthError::Key(format!("{}: {e}", path.display())))?;
            return Ok(Some(Self::build(key, family, None, cfg)));
        }
        Ok(None)
    }

    /// A verifier for a fresh random secret, for a development run with no key configured.
    pub fn generated(cfg: &AuthConfig) -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self::hmac(&secret, cfg)
    }

    fn hmac(secret: &[u8], cfg: &AuthConfig) -> Self {
        let signing = Some((EncodingKey::from_secret(secret), Algorithm::HS256));
        Self::build(
            DecodingKey::from_secret(secret),
            AlgorithmFamily::Hmac,
            signing,
            cfg,
        )
    }

    fn build(
        key: DecodingKey,
        family: AlgorithmFamily,
        signing: Option<(EncodingKey, Algorithm)>,
        cfg: &AuthConfig,
    ) -> Self {
        let mut validation = Validation::new_for_family(family);
        validation.leeway = cfg.leeway();
        validation.set_required_spec_claims(&["exp", "sub"]);
        // RFC 7519 4.1.5: a token must not be accepted before its `nbf` (less the leeway).
        validation.validate_nbf = true;
        match &cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Self {
            key,
            validation,
            signing,
            leeway: cfg.leeway(),
        }
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        // RFC 7515 4.1.11: a recipient that does not understand every extension a `crit`
        // header lists must refuse the token; this server understands none (and an empty
        // list is itself invalid).
        if data.header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        if data.claims.sub.is_empty() {
            return Err(AuthError::Malformed("empty sub".into()));
        }
        // jsonwebtoken admits a token through the whole second of `exp + leeway`; a live
        // connection is closed at its start. Refuse from that instant too, so a client
        // that was just closed with 4401 cannot come straight back with the same token.
        if SystemTime::now() >= self.expires_at(&data.claims) {
            return Err(AuthError::Expired);
        }
        Ok(data.claims)
    }

    /// When a live connection holding these claims must be closed (exp plus leeway).
    pub fn expires_at(&self, claims: &Claims) -> SystemTime {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp.saturating_add(self.leeway)))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(u32::MAX as u64))
    }

    /// Mints a token; only possible with an HMAC secret.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        let (key, alg) = self.signing.as_ref().ok_or_else(|| {
            AuthError::Key("tokens can only be minted with an HMAC secret".into())
        })?;
        jsonwebtoken::encode(&Header::new(*alg), claims, key)
            .map_err(|e| AuthError::Key(e.to_string()))
    }
}

/// Claims for a token valid for `ttl` from now.
pub fn claims_for(
    sub: &str,
    sessions: Vec<String>,
    role: Role,
    name: Option<String>,
    ttl: Duration,
) -> Claims {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let sid = match <[String; 1]>::try_from(sessions) {
        Ok([one]) => SessionScope::One(one),
        Err(many) => SessionScope::Many(many),
    };
    Claims {
        sub: sub.to_owned(),
        exp: (now + ttl).as_secs(),
        sid,
        role,
        name,
        iss: None,
        aud: None,
    }
}

fn parse_public_key(pem: &[u8]) -> Result<(DecodingKey, AlgorithmFamily), String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((k, AlgorithmFamily::Rsa));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((k, AlgorithmFamily::Ec));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Ok((k, AlgorithmFamily::Ed));
    }
    Err("not an RSA, EC or Ed25519 public key in PEM form".into())
}

/// The token carried as `bearer.<jwt>` in the `Sec-WebSocket-Protocol` list, if any.
pub fn bearer_from_subprotocols<'a>(
    mut protocols: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    protocols.find_map(|p| p.trim().strip_prefix("bearer."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            jwt_secret: Some("unit-test-secret-of-at-least-32-bytes".into()),
            leeway_s: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_scope() {
        let v = Verifier::from_config(&cfg()).unwrap().unwrap();
        let c = claims_for(
            "u1",
            vec!["a".into(), "b".into()],
            Role::Viewer,
            None,
            Duration::from_secs(60),
        );
        let t = v.mint(&c).unwrap();
        let got = v.verify(&t).unwrap();
        assert!(got.sid.covers("b") && !got.sid.covers("c"));
        assert_eq!(got.role, Role::Viewer);
    }

    #[test]
    fn other_secret_and_none_alg_are_refused() {
        let v = Verifier::from_config(&cfg()).unwrap().unwrap();
        let other = Verifier::from_config(&AuthConfig {
            jwt_secret: Some("another-unit-test-secret-32-bytes-long".into()),
            ..cfg()
        })
        .unwrap()
        .unwrap();
        let c = claims_for(
            "u",
            vec!["*".into()],
            Role::Student,
            None,
            Duration::from_secs(60),
        );
        let t = other.mint(&c).unwrap();
        assert!(matches!(v.verify(&t), Err(AuthError::BadSignature)));
        // An unsigned token: header {"alg":"none"}.
        let body = t.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(v.verify(&none).is_err());
    }

    fn key_path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/keys")
            .join(name)
    }

    #[test]
    fn public_keys_verify_their_own_family_only() {
        let claims = claims_for(
            "u",
            vec!["s".into()],
            Role::Tutor,
            None,
            Duration::from_secs(60),
        );
        let cases = [
            (
                "ed",
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem as fn(&[u8]) -> _,
            ),
            ("ec", Algorithm::ES256, EncodingKey::from_ec_pem),
            ("rsa", Algorithm::RS256, EncodingKey::from_rsa_pem),
        ];
        for (name, alg, signing_key) in cases {
            let cfg = AuthConfig {
                jwt_public_key_file: Some(key_path(&format!("{name}.pub"))),
                leeway_s: Some(0),
                ..Default::default()
            };
            let v = Verifier::from_config(&cfg).unwrap().unwrap();
            let private = std::fs::read(key_path(&format!("{name}.key"))).unwrap();
            let token =
                jsonwebtoken::encode(&Header::new(alg), &claims, &signing_key(&private).unwrap())
                    .unwrap();
            assert_eq!(v.verify(&token).unwrap().sub, "u", "{name}");
            // Algorithm confusion: an HMAC token keyed with the public key's own bytes.
            let public = std::fs::read(key_path(&format!("{name}.pub"))).unwrap();
            let forged = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(&public),
            )
            .unwrap();
            assert!(
                v.verify(&forged).is_err(),
                "{name}: HS256 with the public key accepted"
            );
            assert!(
                v.mint(&claims).is_err(),
                "{name}: cannot mint without a secret"
            );
        }
    }

    #[test]
    fn a_list_valued_audience_is_accepted_and_checked_when_configured() {
        let mut c = claims_for(
            "u",
            vec!["s".into()],
            Role::Student,
            None,
            Duration::from_secs(60),
        );
        c.aud = Some(Audience::Many(vec!["easel".into(), "other".into()]));
        // No audience configured: the claim is not checked, whatever its shape.
        let open = Verifier::from_config(&cfg()).unwrap().unwrap();
        open.verify(&open.mint(&c).unwrap()).unwrap();
        // Configured: a list holding it passes, one without it does not.
        let strict = Verifier::from_config(&AuthConfig {
            audience: Some("easel".into()),
            ..cfg()
        })
        .unwrap()
        .unwrap();
        strict.verify(&strict.mint(&c).unwrap()).unwrap();
        c.aud = Some(Audience::Many(vec!["other".into()]));
        assert!(strict.verify(&strict.mint(&c).unwrap()).is_err());
        c.aud = Some(Audience::One("easel".into()));
        strict.verify(&strict.mint(&c).unwrap()).unwrap();
    }

    #[test]
    fn short_secrets_are_refused_with_their_source() {
        let err = Verifier::from_config(&AuthConfig {
            jwt_secret: Some("dev".into()),
            ..cfg()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("EASEL_JWT_SECRET") && err.contains("32"),
            "{err}"
        );
    }

    #[test]
    fn short_secret_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "short\n").unwrap();
        let err = Verifier::from_config(&AuthConfig {
            jwt_secret_file: Some(path.clone()),
            leeway_s: Some(0),
            ..Default::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("EASEL_JWT_SECRET_FILE") && err.contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, format!("{}\n", "k".repeat(32))).unwrap();
        assert!(Verifier::from_config(&AuthConfig {
            jwt_secret_file: Some(path),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn nbf_and_crit_are_honoured() {
        let v = Verifier::from_config(&cfg()).unwrap().unwrap();
        let (key, alg) = v.signing.as_ref().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims =
            |nbf: u64| serde_json::json!({"sub": "u", "sid": "s", "exp": now + 600, "nbf": nbf});
        let future = jsonwebtoken::encode(&Header::new(*alg), &claims(now + 300), key).unwrap();
        assert!(matches!(v.verify(&future), Err(AuthError::NotYetValid)));
        let past = jsonwebtoken::encode(&Header::new(*alg), &claims(now - 5), key).unwrap();
        assert!(v.verify(&past).is_ok());
        let mut header = Header::new(*alg);
        header.crit = Some(vec!["exp-ext".into()]);
        let crit = jsonwebtoken::encode(&header, &claims(now - 5), key).unwrap();
        assert!(matches!(v.verify(&crit), Err(AuthError::Critical)));
    }

    #[test]
    fn missing_sid_is_malformed() {
        let v = Verifier::from_config(&cfg()).unwrap().unwrap();
        #[derive(Serialize)]
        struct NoSid {
            sub: String,
            exp: u64,
        }
        let (key, alg) = v.signing.as_ref().unwrap();
        let t = jsonwebtoken::encode(
            &Header::new(*alg),
            &NoSid {
                sub: "u".into(),
                exp: u64::MAX / 2,
            },
            key,
        )
        .unwrap();
        assert!(matches!(v.verify(&t), Err(AuthError::Malformed(_))));
    }
}
