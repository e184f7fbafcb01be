//! Snapshot routes (SPEC.md 5.3, 6): list, take, download and restore versions. Must not
//! touch the live document except through `Whiteboard::snapshot_now` and `restore`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::{blocking, require_snapshot_role, rfc3339_ms, storage, ApiError, ApiPath, QueryMap};
use crate::app::AppState;
use crate::session::whiteboard::RestoreFailure;
use crate::store::SnapshotInfo;

#[derive(Serialize)]
struct VersionJson {
    version: u64,
    created_at: String,
    bytes: u64,
    updates: u64,
}

impl From<SnapshotInfo> for VersionJson {
    fn from(i: SnapshotInfo) -> Self {
        Self {
            version: i.version,
            created_at: rfc3339_ms(i.created_at_ms),
            bytes: i.bytes,
            updates: i.updates,
        }
    }
}

pub async fn list_snapshots(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    app.refuse_removed(&claims, &session).await?;
    let store = app.store.clone();
    let versions = blocking(move || store.list_snapshots(&session).map_err(storage)).await?;
    let versions: Vec<VersionJson> = versions.into_iter().map(Into::into).collect();
    Ok(Json(json!({ "versions": versions })))
}

pub async fn take_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    require_snapshot_role(&claims)?;
    let handle = app.open_session(&claims, &session).await?;
    let version = blocking(move || handle.whiteboard.snapshot_now().map_err(storage)).await?;
    tracing::info!(%session, user = %claims.sub, version, "snapshot taken");
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))))
}

pub async fn get_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath((session, version)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    app.refuse_removed(&claims, &session).await?;
    let store = app.store.clone();
    let state = blocking(move || store.get_snapshot(&session, version).map_err(storage))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no snapshot version {version}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], state).into_response())
}

pub async fn restore_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath((session, version)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    require_snapshot_role(&claims)?;
    let handle = app.open_session(&claims, &session).await?;
    let new_version = blocking(move || {
        handle.whiteboard.restore(version).map_err(|e| match e {
            RestoreFailure::NoSuchVersion(v) => {
                ApiError::NotFound(format!("no snapshot version {v}"))
            }
            RestoreFailure::Store(e) => storage(e),
            other => ApiError::Internal(other.to_string()),
        })
    })
    .await?;
    tracing::info!(%session, user = %claims.sub, version, new_version, "snapshot restored");
    Ok(Json(json!({ "version": new_version })))
}
