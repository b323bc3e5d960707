//! The router: `fn app(state) -> Router`, used by `serve` and by the unit tests (`oneshot`),
//! and the handlers that are not a relayed request (health, metrics).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::Instrument;

use crate::db;
use crate::error::AppError;
use crate::openai::Endpoint;
use crate::proxy::{lifecycle, models::list_models};
use crate::state::{new_request_id, AppState};

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route(
            "/v1/chat/completions",
            post(|s: State<AppState>, r: Request| relay(s, Endpoint::ChatCompletions, r)),
        )
        .route(
            "/v1/completions",
            post(|s: State<AppState>, r: Request| relay(s, Endpoint::Completions, r)),
        )
        .route(
            "/v1/embeddings",
            post(|s: State<AppState>, r: Request| relay(s, Endpoint::Embeddings, r)),
        )
        .route(
            "/v1/responses",
            post(|s: State<AppState>, r: Request| relay(s, Endpoint::Responses, r)),
        )
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .with_state(state)
}

async fn relay(State(state): State<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let request_id = new_request_id();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        endpoint = endpoint.label(),
        key_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        channel_id = tracing::field::Empty,
    );
    let result = lifecycle::handle(state.clone(), endpoint, request_id.clone(), req)
        .instrument(span.clone())
        .await;
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            // errors found before the lifecycle task started (auth, body, JSON)
            state.metrics.request(endpoint.label(), e.outcome());
            span.in_scope(
                || tracing::info!(status = e.status_code().as_u16(), error = %e, "request refused"),
            );
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

async fn healthz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(3), db::ping(&state.pool)).await {
        Ok(Ok(server)) => Json(json!({"status": "ok", "database": "ok", "database_host": server})).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            degraded()
        }
        Err(_) => {
            tracing::warn!("health check: database did not answer within 3 s");
            degraded()
        }
    }
}

fn degraded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "degraded", "database": "unreachable"})),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<AppState>, req: Request) -> Response {
    let request_id = new_request_id();
    let mut response = match list_models(&state, &request_id, req.headers()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_relay;
    use axum::body::Body;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::ServiceExt;

    const BEARER: &str = concat!(
        "Bearer sk-pgq-0123456789ab-",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );

    fn relay_without_db(fail_open: bool, upstream_url: Option<String>) -> AppState {
        test_relay(fail_open, upstream_url, Duration::from_secs(10))
    }

    async fn send(
        state: &AppState,
        req: axum::http::Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = app(state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, body)
    }

    fn chat(auth: Option<&str>, body: impl Into<Body>) -> axum::http::Request<Body> {
        let mut r = axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(body.into()).unwrap()
    }

    #[tokio::test]
    async fn missing_or_garbled_auth_is_401_without_the_database() {
        let state = relay_without_db(false, None);
        for auth in [None, Some("sk-no-scheme"), Some("Bearer ")] {
            let (status, headers, body) = send(&state, chat(auth, r#"{"model":"m"}"#)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(body["error"]["code"], "invalid_api_key");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert!(headers["x-request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_"));
        }
    }

    #[tokio::test]
    async fn body_over_the_limit_is_413() {
        let state = relay_without_db(false, None);
        let big = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(2000)
        );
        let (status, _, body) = send(&state, chat(Some(BEARER), big.clone())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "request_too_large");
        // without a Content-Length the limit still holds while streaming the body in
        let stream = futures_util::stream::iter(
            big.into_bytes()
                .chunks(100)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let (status, _, _) = send(&state, chat(Some(BEARER), Body::from_stream(stream))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn malformed_json_and_missing_model_are_400() {
        let state = relay_without_db(false, None);
        let (status, _, body) = send(&state, chat(Some(BEARER), "{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_json");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let (status, _, body) = send(&state, chat(Some(BEARER), r#"{"messages":[]}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "model");
        let (status, _, _) = send(&state, chat(Some(BEARER), "[1,2]")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, body) = send(
            &state,
            chat(Some(BEARER), r#"{"model":"m","max_tokens":-5}"#),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "max_tokens");
    }

    #[tokio::test]
    async fn database_down_fails_closed_with_503() {
        let state = relay_without_db(false, Some("http://127.0.0.1:1/v1".into()));
        let (status, _, body) =
            send(&state, chat(Some(BEARER), r#"{"model":"m","messages":[]}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "quota_database_unavailable");
        assert_eq!(body["error"]["type"], "server_error");
        let metrics = state.metrics.render();
        assert!(metrics.contains(r#"pgq_relay_requests_total{endpoint="chat_completions",outcome="database_unavailable"} 1"#), "{metrics}");
    }

    #[tokio::test]
    async fn healthz_reports_an_unreachable_database() {
        let state = relay_without_db(false, None);
        let req = axum::http::Request::get("/healthz")
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&state, req).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            json!({"status": "degraded", "database": "unreachable"})
        );
    }

    #[tokio::test]
    async fn fail_open_forwards_without_accounting_and_says_so() {
        let mock = crate::mock::spawn_for_tests(3).await;
        let state = relay_without_db(true, Some(format!("{mock}/v1")));
        // a key never admitted is refused as with fail-closed
        let (status, _, body) =
            send(&state, chat(Some(BEARER), r#"{"model":"m","messages":[]}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "quota_database_unavailable");
        // one admitted a moment ago passes
        state.fail_open.admitted(&BEARER["Bearer ".len()..], 7);
        let (status, headers, body) = send(
            &state,
            chat(
                Some(BEARER),
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["x-pgq-accounting"], "off");
        assert_eq!(body["usage"]["completion_tokens"], 3);
        // streaming passes through untouched: no include_usage injected, no accounting
        let (status, headers, body) = send(
            &state,
            chat(Some(BEARER), r#"{"model":"m","stream":true,"messages":[]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/event-stream");
        assert!(body.as_str().unwrap().ends_with("data: [DONE]\n\n"));
        let seen = crate::mock::requests_seen(&mock).await;
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0]["authorization"], "Bearer sk-upstream-test",
            "the client's key is not forwarded"
        );
        assert!(seen[1]["body"].get("stream_options").is_none());
        assert!(state.metrics.render().contains(r#"outcome="fail_open"} 2"#));
        assert!(state
            .metrics
            .render()
            .contains(r#"outcome="database_unavailable"} 1"#));
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_openai_errors() {
        let state = relay_without_db(false, None);
        let (status, _, body) = send(
            &state,
            axum::http::Request::get("/v1/nothing")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let (status, _, body) = send(
            &state,
            axum::http::Request::get("/v1/chat/completions")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }

    #[tokio::test]
    async fn models_needs_a_key_and_metrics_are_exposed() {
        let state = relay_without_db(false, None);
        let (status, _, body) = send(
            &state,
            axum::http::Request::get("/v1/models")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, headers, body) = send(
            &state,
            axum::http::Request::get("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert!(body
            .as_str()
            .unwrap()
            .contains("pgq_relay_reservations_in_flight 0"));
    }
}
