//! Tutor chat over plain HTTP: history pages (optionally as a long poll) and posted
//! messages, stored and relayed like a WebSocket chat frame. Must not relay by itself:
//! the session does.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::json;

use super::{
    blocking, number_param, on_lane, read_body, storage, wait_param, ApiError, ApiPath, QueryMap,
};
use crate::app::{user_info, AppState};
use crate::protocol::tutor::ChatMessage;
use crate::session::tutor::{check_text, ChatTextError, PostError};

/// `GET /api/v2/session/{id}/tutor/messages?after=N&limit=M&wait=S`: chat after `after`,
/// oldest first, with `last_seq` and (SPEC 4.1) the `changes` to messages up to `after`;
/// with `wait`, held until a message after `after` exists or a message is changed.
pub async fn get_messages(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The token first: a client without one is told 401, whatever else it sent.
    let claims = app.authorize(&session, &headers, &query, None)?;
    // Changes are stamped no earlier than the clock's now, so any made from here on wake
    // the poll, even one made before it subscribes below (while the session opens).
    let arrived_ms = crate::session::tutor::now_ms();
    let after = number_param(&query, "after")?.unwrap_or(0);
    let limit = number_param(&query, "limit")?.unwrap_or(50).clamp(1, 200) as usize;
    let wait = wait_param(&query)?;
    let _poll = wait.map(|_| app.long_poll(&claims, &session)).transpose()?;
    let handle = app.open_session(&claims, &session).await?;
    if let Some(wait) = wait {
        let mut seq = handle.tutor.subscribe();
        // An edit or deletion (SPEC 4.1) also ends the wait: it is in the answer's `changes`.
        let mut amends = handle.tutor.subscribe_amends();
        let _ = tokio::time::timeout(wait, async {
            tokio::select! {
                _ = seq.wait_for(|last| *last > after) => {}
                _ = amends.wait_for(|latest| *latest >= arrived_ms) => {}
            }
        })
        .await;
    }
    let (messages, last_seq, changes) = blocking(move || {
        let messages = handle.tutor.history_after(after, limit).map_err(storage)?;
        // SPEC 4.1: what changed in the messages up to `after` since it was posted.
        let changes = super::moderation::changes_since(&handle, after)?;
        Ok((messages, handle.tutor.last_seq(), changes))
    })
    .await?;
    let mut body = json!({ "messages": messages, "last_seq": last_seq });
    if let Some(changes) = changes {
        body["changes"] = changes;
    }
    Ok(Json(body))
}

#[derive(serde::Deserialize)]
pub struct PostMessage {
    text: String,
    #[serde(default)]
    client_id: Option<String>,
}

/// `POST /api/v2/session/{id}/tutor/messages` `{"text":"…"}`: stored and relayed to the
/// WebSocket clients like a chat frame; `201` with the stored message.
pub async fn post_message(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    req: Request,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    // Token, scope and role before a byte of the body is read.
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !claims.role.can_write() {
        return Err(ApiError::Forbidden("viewers may not chat".into()));
    }
    let body = read_body(req, &app.config.limits, &app.metrics).await?;
    let handle = app.open_session(&claims, &session).await?;
    if handle.tutor.is_muted(&claims.sub, claims.role) {
        return Err(ApiError::Muted("you are muted in this session".into()));
    }
    let post: PostMessage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"text\":\"…\"}}: {e}")))?;
    check_text(&post.text, app.config.tutor.max_text_chars).map_err(|e| match e {
        ChatTextError::Empty => ApiError::BadRequest(e.to_string()),
        ChatTextError::TooLong { .. } => ApiError::TooLarge(e.to_string()),
    })?;
    // The same bound as on the WebSocket (SPEC 7.1): a client_id is stored, relayed and
    // served in every history page.
    let max_client_id = app.config.tutor.max_client_id_bytes;
    if post
        .client_id
        .as_ref()
        .is_some_and(|c| c.len() > max_client_id)
    {
        return Err(ApiError::TooLarge(format!(
            "client_id is longer than {max_client_id} bytes"
        )));
    }
    let from = user_info(&claims);
    // Stored and relayed on the room's lane, off the async workers.
    let posted = handle
        .tutor
        .post_chat(from, claims.role, post.text, post.client_id);
    let message = on_lane(handle, async move {
        posted.await.map_err(|e| match e {
            PostError::Muted => ApiError::Muted(e.to_string()),
            PostError::Store(e) => storage(e),
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(message)))
}
