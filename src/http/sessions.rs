//! Session-level routes: the list of stored sessions (admin) and student links minted by a
//! tutor. Must not touch a session's document or chat.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::json;

use super::{blocking, storage, ApiError, ApiPath, QueryMap};
use crate::app::AppState;
use crate::auth::Role;

/// `POST /api/v2/session/{id}/student-link` (tutor, admin): a student token for this
/// session, so a tutor can hand out a link without a command line. Valid 12 hours, never
/// longer than the tutor's own token; minted only where the server holds an HMAC secret
/// (with a public key, tokens come from the identity provider: `501`).
pub async fn student_link(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    const LINK_TTL_S: u64 = 12 * 3600;
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !matches!(claims.role, Role::Tutor | Role::Admin) {
        return Err(ApiError::Forbidden(
            "only tutors and admins may hand out student links".into(),
        ));
    }
    app.refuse_removed(&claims, &session).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let ttl = claims.exp.saturating_sub(now).min(LINK_TTL_S);
    if ttl == 0 {
        // Within the leeway past its `exp`: a link minted now would be dead on arrival.
        return Err(ApiError::Unauthorized(
            "your token has expired: get a new one first".into(),
        ));
    }
    // 64 random bits: two links never share a student's identity (presence, caps).
    let student = format!("student-{:016x}", rand::random::<u64>());
    let mut minted = crate::auth::claims_for(
        &student,
        vec![session.clone()],
        Role::Student,
        Some("Student".into()),
        std::time::Duration::from_secs(ttl),
    );
    // Whatever this server checks of its tokens, the minted one carries.
    minted.iss = app.config.auth.issuer.clone();
    minted.aud = app
        .config
        .auth
        .audience
        .clone()
        .map(crate::auth::Audience::One);
    let token = app.verifier.mint(&minted).map_err(|e| {
        ApiError::NotImplemented(format!(
            "this server cannot mint tokens ({e}); mint student tokens where yours come from"
        ))
    })?;
    tracing::info!(%session, user = %claims.sub, student, ttl_s = ttl, "student link minted");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "path": format!("/?session={session}&token={token}"),
            "expires_in_s": ttl,
        })),
    ))
}

/// Every stored session (an `admin` token covering `*`): what `easel sessions --server` shows.
pub async fn list_sessions(
    State(app): State<Arc<AppState>>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = app.authorize("_all", &headers, &query, None)?;
    if claims.role != Role::Admin || !claims.sid.covers("*") {
        return Err(ApiError::Forbidden(
            "listing sessions needs an admin token for sid \"*\"".into(),
        ));
    }
    let store = app.store.clone();
    let sessions = blocking(move || store.list_sessions().map_err(storage)).await?;
    Ok(Json(json!({ "sessions": sessions })))
}
