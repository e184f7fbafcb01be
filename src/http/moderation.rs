//! The HTTP fallback of SPEC 4.1: `PATCH` and `DELETE /api/v2/session/{id}/tutor/messages/{seq}`
//! and `POST /api/v2/session/{id}/tutor/moderation`, and the `changes` of a chat list.
//!
//! Same order of work as every session route (see [`crate::http`]): token, scope and
//! role first, then the body. The rules themselves are the tutor room's
//! ([`crate::session::tutor`]); this module maps its refusals to statuses: `404`
//! `not_found`, `403` `forbidden` (with `"reason":"muted"` for a muted user), `400`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::{on_lane, read_body, storage, ApiError, ApiPath, QueryMap};
use crate::app::{user_info, AppState};
use crate::protocol::tutor::{ChatMessage, ClientMessage};
use crate::session::tutor::{check_text, AmendError, ChatTextError, ModerateError};
use crate::session::SessionHandle;

fn amend_error(e: AmendError) -> ApiError {
    match e {
        AmendError::NotFound(_) => ApiError::NotFound(e.to_string()),
        AmendError::Forbidden(_) => ApiError::Forbidden(e.to_string()),
        AmendError::Muted => ApiError::Muted(e.to_string()),
        AmendError::Store(e) => storage(e),
    }
}

fn moderate_error(e: ModerateError) -> ApiError {
    match e {
        ModerateError::Forbidden(_) => ApiError::Forbidden(e.to_string()),
        ModerateError::BadRequest(_) => ApiError::BadRequest(e.to_string()),
        ModerateError::Store(e) => storage(e),
    }
}

#[derive(Deserialize)]
struct EditBody {
    text: String,
}

/// `PATCH .../tutor/messages/{seq}` `{"text":"…"}`: edits a message (its author, a tutor
/// or an admin); `200` with the message as now stored; relayed as `chat_edited`.
pub async fn patch_message(
    State(app): State<Arc<AppState>>,
    ApiPath((session, seq)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    req: Request,
) -> Result<Json<ChatMessage>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !claims.role.can_write() {
        return Err(ApiError::Forbidden("viewers may not change chat".into()));
    }
    let body = read_body(req, &app.config.limits, &app.metrics).await?;
    let handle = app.open_session(&claims, &session).await?;
    let edit: EditBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"text\":\"…\"}}: {e}")))?;
    check_text(&edit.text, app.config.tutor.max_text_chars).map_err(|e| match e {
        ChatTextError::Empty => ApiError::BadRequest(e.to_string()),
        ChatTextError::TooLong { .. } => ApiError::TooLarge(e.to_string()),
    })?;
    let by = user_info(&claims);
    let role = claims.role;
    let edited = handle.tutor.edit_chat(&by, role, seq, edit.text);
    let message = on_lane(handle, async move { edited.await.map_err(amend_error) }).await?;
    Ok(Json(message))
}

/// `DELETE .../tutor/messages/{seq}`: deletes a message (its author, a tutor or an admin);
/// `200` with what is left (`{"seq","deleted":true,"deleted_at"}`); relayed as
/// `chat_deleted`.
pub async fn delete_message(
    State(app): State<Arc<AppState>>,
    ApiPath((session, seq)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<ChatMessage>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !claims.role.can_write() {
        return Err(ApiError::Forbidden("viewers may not change chat".into()));
    }
    let handle = app.open_session(&claims, &session).await?;
    let by = user_info(&claims);
    let role = claims.role;
    let deleted = handle.tutor.delete_chat(&by, role, seq);
    let message = on_lane(handle, async move { deleted.await.map_err(amend_error) }).await?;
    Ok(Json(message))
}

/// `POST .../tutor/moderation` `{"type":"mute","user":"ID","until":…}` or
/// `{"type":"remove","user":"ID"}` (tutors and admins): `200` with the `moderation`
/// announcement every connection got.
pub async fn post_moderation(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !crate::session::tutor::is_moderator(claims.role) {
        return Err(ApiError::Forbidden(
            "only tutors and admins may mute or remove".into(),
        ));
    }
    let body = read_body(req, &app.config.limits, &app.metrics).await?;
    let handle = app.open_session(&claims, &session).await?;
    // The body is the WebSocket's `mute` or `remove` frame, parsed as one.
    let expected = "expected {\"type\":\"mute\"|\"remove\",\"user\":\"…\"}";
    let request: ClientMessage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("{expected}: {e}")))?;
    let by = user_info(&claims);
    let role = claims.role;
    // On the room's lane, off the async workers.
    let tutor = &handle.tutor;
    let change: Pin<Box<dyn Future<Output = _> + Send>> = match request {
        ClientMessage::Mute { user, until } => {
            Box::pin(tutor.mute(&by, role, &user, until.as_deref()))
        }
        ClientMessage::Remove { user } => Box::pin(tutor.remove(&by, role, &user)),
        _ => return Err(ApiError::BadRequest(expected.into())),
    };
    let announced = on_lane(handle, async move { change.await.map_err(moderate_error) }).await?;
    let value: Value =
        serde_json::from_str(&announced).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(value))
}

/// Most `changes` a chat list carries (beyond it, a client reloads the history).
const MAX_CHANGES_PAGES: usize = 10;

/// The `changes` of `GET .../tutor/messages?after=N` (N > 0): the `chat_edited` and
/// `chat_deleted` objects of the messages up to N changed since N was posted (the same
/// set an `after_seq` resume gets), so a polling client converges too. `None` for N = 0.
/// Runs on the blocking pool.
pub fn changes_since(handle: &SessionHandle, after: u64) -> Result<Option<Value>, ApiError> {
    if after == 0 {
        return Ok(None);
    }
    let reader = handle.tutor.reader();
    let mut out = Vec::new();
    let mut cursor = None;
    for _ in 0..MAX_CHANGES_PAGES {
        let (frames, next) = reader.changes_page(after, cursor).map_err(storage)?;
        for frame in frames {
            if let Ok(v) = serde_json::from_str::<Value>(&frame) {
                out.push(v);
            }
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    Ok(Some(Value::Array(out)))
}
