//! `GET /v1/models`: the models a key may use, as the engine lists them.

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::db;
use crate::error::{AppError, DbError};
use crate::proxy::ingress::bearer_token;
use crate::proxy::upstream::complete_response;
use crate::state::AppState;

/// `GET /v1/models`: the models this key may use.
pub async fn list_models(
    state: &AppState,
    request_id: &str,
    headers: &HeaderMap,
) -> Result<Response, AppError> {
    let api_key = bearer_token(headers)?;
    match db::models(&state.pool, &api_key).await {
        Ok(models) => {
            let data: Vec<Value> = models
                .into_iter()
                .map(|m| {
                    json!({
                        "id": m.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": m.owned_by.unwrap_or_else(|| "system".into()),
                    })
                })
                .collect();
            Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
        }
        Err(DbError::Unavailable(cause)) if state.fail_open.pass(&api_key).is_ok() => {
            tracing::warn!(%request_id, %cause, "quota database unreachable: listing the upstream's models for a recently admitted key (--fail-open)");
            let base = state
                .config
                .upstream_url
                .as_deref()
                .ok_or(AppError::DatabaseUnavailable)?;
            let mut request = state
                .http
                .get(format!("{}/models", base.trim_end_matches('/')));
            if let Some(key) = &state.config.upstream_api_key {
                request = request.bearer_auth(key);
            }
            let response = request
                .send()
                .await
                .map_err(|_| AppError::UpstreamUnavailable("the upstream could not be reached"))?;
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|_| AppError::UpstreamUnavailable("the upstream response was cut off"))?;
            let mut r = complete_response(status, None, body);
            r.headers_mut()
                .insert("x-pgq-accounting", HeaderValue::from_static("off"));
            Ok(r)
        }
        Err(e) => Err(e.into()),
    }
}
