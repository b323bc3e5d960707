//! A fake OpenAI-compatible upstream: real HTTP, real SSE, correct `usage`.
//!
//! Behaviour is set by flags and, per request, by headers (headers win):
//! `x-mock-latency-ms`, `x-mock-output-tokens`, `x-mock-input-tokens`, `x-mock-chunk-delay-ms`,
//! `x-mock-cached-tokens`, `x-mock-fail` (`500`, `429`, any 4xx/5xx status, with the body
//! OpenAI sends for it; `timeout`, `disconnect-mid-stream`), `x-mock-omit-usage: 1` (an
//! upstream that reports no usage: no `usage` in bodies, no usage chunk in streams). Like a
//! real model it stops at the request's output limit (`max_tokens`, `max_completion_tokens`,
//! `max_output_tokens`) with `finish_reason: "length"` (Responses: status `incomplete`). Every request is recorded (method, path, headers without
//! `authorization`, the `authorization` value on its own, body) and listed, oldest first, at
//! `GET /_mock/requests`; `DELETE /_mock/requests` forgets them.

pub(crate) mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::MockArgs;
use crate::openai::{error_body, Endpoint};

/// Requests kept for `/_mock/requests`.
const RECORDED: usize = 1000;
/// How long `x-mock-fail: timeout` keeps the client waiting.
const TIMEOUT_SLEEP: Duration = Duration::from_secs(3600);

pub struct MockState {
    defaults: MockArgs,
    requests: Mutex<VecDeque<Value>>,
    next_id: AtomicU64,
}

pub fn app(defaults: MockArgs) -> Router {
    let state = Arc::new(MockState {
        defaults,
        requests: Mutex::new(VecDeque::new()),
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|s: State<Arc<MockState>>, r: Request| generate(s, Endpoint::ChatCompletions, r)),
        )
        .route(
            "/v1/completions",
            post(|s: State<Arc<MockState>>, r: Request| generate(s, Endpoint::Completions, r)),
        )
        .route(
            "/v1/embeddings",
            post(|s: State<Arc<MockState>>, r: Request| generate(s, Endpoint::Embeddings, r)),
        )
        .route(
            "/v1/responses",
            post(|s: State<Arc<MockState>>, r: Request| generate(s, Endpoint::Responses, r)),
        )
        .route("/v1/models", get(models))
        .route("/_mock/requests", get(recorded).delete(forget))
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(state)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fail {
    Status(StatusCode),
    Timeout,
    DisconnectMidStream,
}

#[derive(Debug, Clone)]
struct Behavior {
    latency: Duration,
    output_tokens: u64,
    input_tokens: Option<u64>,
    chunk_delay: Duration,
    cached_tokens: u64,
    fail: Option<Fail>,
    omit_usage: bool,
}

fn parse_fail(s: &str) -> Result<Fail, String> {
    match s.trim() {
        "timeout" => Ok(Fail::Timeout),
        "disconnect-mid-stream" => Ok(Fail::DisconnectMidStream),
        other => other
            .parse::<u16>()
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
            .filter(|s| s.is_client_error() || s.is_server_error())
            .map(Fail::Status)
            .ok_or_else(|| format!("x-mock-fail: unknown failure {other:?}")),
    }
}

impl Behavior {
    fn from(defaults: &MockArgs, headers: &HeaderMap) -> Result<Self, String> {
        fn num(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| format!("{name} must be a non-negative integer"))
                })
                .transpose()
        }
        let fail = match headers.get("x-mock-fail") {
            Some(v) => Some(parse_fail(
                v.to_str().map_err(|_| "x-mock-fail is not text")?,
            )?),
            None => defaults.fail.as_deref().map(parse_fail).transpose()?,
        };
        Ok(Behavior {
            latency: Duration::from_millis(
                num(headers, "x-mock-latency-ms")?.unwrap_or(defaults.latency_ms),
            ),
            output_tokens: num(headers, "x-mock-output-tokens")?.unwrap_or(defaults.output_tokens),
            input_tokens: num(headers, "x-mock-input-tokens")?,
            chunk_delay: Duration::from_millis(
                num(headers, "x-mock-chunk-delay-ms")?.unwrap_or(defaults.chunk_delay_ms),
            ),
            cached_tokens: num(headers, "x-mock-cached-tokens")?.unwrap_or(defaults.cached_tokens),
            fail,
            omit_usage: num(headers, "x-mock-omit-usage")?.is_some_and(|n| n > 0),
        })
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(status: StatusCode, message: &str, code: Option<&str>) -> Response {
    (status, Json(error_body(status, message, code, None))).into_response()
}

impl MockState {
    fn record(&self, method: &str, path: &str, headers: &HeaderMap, body: &[u8]) {
        let mut recorded_headers = serde_json::Map::new();
        for (name, value) in headers {
            if name == header::AUTHORIZATION {
                continue;
            }
            recorded_headers.insert(
                name.to_string(),
                Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            );
        }
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let entry = json!({
            "method": method,
            "path": path,
            "headers": recorded_headers,
            // a test upstream only ever sees test keys; kept apart so tests can check which
            // key the relay sent
            "authorization": headers.get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            "body": body,
        });
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.len() == RECORDED {
            requests.pop_front();
        }
        requests.push_back(entry);
    }
}

async fn recorded(State(state): State<Arc<MockState>>) -> Json<Value> {
    let requests = state.requests.lock().unwrap_or_else(|p| p.into_inner());
    Json(Value::Array(requests.iter().cloned().collect()))
}

async fn forget(State(state): State<Arc<MockState>>) -> StatusCode {
    state
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    StatusCode::NO_CONTENT
}

async fn models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    state.record("GET", "/v1/models", &headers, b"");
    Json(wire::models()).into_response()
}

async fn generate(
    State(state): State<Arc<MockState>>,
    endpoint: Endpoint,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return error(StatusCode::BAD_REQUEST, "could not read the body", None);
    };
    state.record(
        parts.method.as_str(),
        parts.uri.path(),
        &parts.headers,
        &bytes,
    );
    let behavior = match Behavior::from(&state.defaults, &parts.headers) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, Some("bad_mock_header")),
    };
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    match behavior.fail {
        Some(Fail::Status(status)) => return failure(status, &bytes),
        Some(Fail::Timeout) => {
            tokio::time::sleep(TIMEOUT_SLEEP).await;
            return error(StatusCode::GATEWAY_TIMEOUT, "mock upstream timed out", None);
        }
        _ => {}
    }
    let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            None,
        );
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    // like a real model, stop at the request's output limit
    let limit = endpoint
        .output_limit_fields()
        .iter()
        .find_map(|f| body.get(*f).and_then(Value::as_u64));
    let wanted = if endpoint == Endpoint::Embeddings {
        0
    } else {
        behavior.output_tokens
    };
    let completion = limit.map_or(wanted, |l| wanted.min(l));
    let counts = wire::Counts {
        prompt: behavior
            .input_tokens
            .unwrap_or_else(|| wire::prompt_tokens(endpoint, &body)),
        completion,
        cached: behavior.cached_tokens,
        truncated: completion < wanted,
    };
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let created = now_secs();
    let stream = endpoint != Endpoint::Embeddings && body.get("stream") == Some(&Value::Bool(true));
    let disconnect = behavior.fail == Some(Fail::DisconnectMidStream);

    if !stream {
        let mut value = match endpoint {
            Endpoint::ChatCompletions => {
                wire::chat_completion(&format!("chatcmpl-mock{n}"), created, &model, counts)
            }
            Endpoint::Completions => {
                wire::text_completion(&format!("cmpl-mock{n}"), created, &model, counts)
            }
            Endpoint::Embeddings => wire::embeddings(&model, &body, counts),
            Endpoint::Responses => wire::response_object(
                &format!("resp_mock{n}"),
                created,
                &model,
                counts.response_status(),
                Some(counts),
            ),
        };
        if let Some(fields) = value.as_object_mut().filter(|_| behavior.omit_usage) {
            fields.remove("usage");
        }
        let text = value.to_string();
        if disconnect {
            // headers and half a body, then the connection breaks
            let half = Bytes::from(text[..text.len() / 2].to_string());
            let parts: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(half),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "mock disconnect",
                )),
            ];
            let mut r = Response::new(Body::from_stream(futures_util::stream::iter(parts)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        return ([(header::CONTENT_TYPE, "application/json")], text).into_response();
    }

    let include_usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true))
        && !behavior.omit_usage;
    let id = match endpoint {
        Endpoint::Responses => format!("resp_mock{n}"),
        Endpoint::Completions => format!("cmpl-mock{n}"),
        _ => format!("chatcmpl-mock{n}"),
    };
    let events = wire::stream_events(endpoint, &id, created, &model, counts, include_usage);
    // break after the role chunk and half of the content
    let cut = disconnect.then(|| 1 + (counts.completion as usize) / 2);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let delay = behavior.chunk_delay;
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            if cut == Some(i) {
                // let what was sent reach the client before the connection breaks
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "mock disconnect",
                    )))
                    .await;
                return;
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                return; // the client left
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An injected failure with the body OpenAI sends for it, which names the upstream's model,
/// its organization and its limits (what a relay must not show its clients).
fn failure(status: StatusCode, body: &[u8]) -> Response {
    let model = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b.get("model").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "mock-model".into());
    const ORG: &str = "org-mOcK0rg4n1zat10n";
    let (message, code) = match status.as_u16() {
        401 => (
            "Incorrect API key provided: sk-upstr**************test. You can find your API key at https://platform.openai.com/account/api-keys.".to_string(),
            "invalid_api_key",
        ),
        403 => (
            format!("Project proj_mOcKpr0j3ct does not have access to model `{model}` in organization {ORG}."),
            "model_not_allowed",
        ),
        404 => (
            format!("The model `{model}` does not exist or you do not have access to it."),
            "model_not_found",
        ),
        429 => (
            format!("Rate limit reached for {model} in organization {ORG} on tokens per min (TPM): Limit 30000, Used 29950, Requested 100."),
            "rate_limit_exceeded",
        ),
        400..=499 => (
            format!("Invalid request for model `{model}` in organization {ORG}."),
            "invalid_request",
        ),
        n => (format!("mock upstream failure (HTTP {n})"), "mock_failure"),
    };
    let mut r = error(status, &message, Some(code));
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// `mock-upstream`: binds, prints the listening line, serves until SIGTERM/Ctrl-C.
pub async fn run(args: MockArgs) -> std::process::ExitCode {
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-upstream: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    crate::server::announce(&format!("mock-upstream listening on http://{addr}"));
    let served = axum::serve(listener, app(args))
        .with_graceful_shutdown(crate::server::shutdown_signal())
        .await;
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-upstream: server error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// A mock on a free loopback port, in this process; returns its base URL (without `/v1`).
#[cfg(test)]
pub async fn spawn_for_tests(output_tokens: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let args = MockArgs {
        listen: addr,
        latency_ms: 0,
        output_tokens,
        chunk_delay_ms: 0,
        cached_tokens: 0,
        fail: None,
    };
    tokio::spawn(async move { axum::serve(listener, app(args)).await.unwrap() });
    format!("http://{addr}")
}

/// The requests a mock from [`spawn_for_tests`] has received, oldest first (`/_mock/requests`).
#[cfg(test)]
pub async fn requests_seen(mock: &str) -> Vec<serde_json::Value> {
    let seen: serde_json::Value = reqwest::get(format!("{mock}/_mock/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    seen.as_array().unwrap().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn defaults() -> MockArgs {
        MockArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            latency_ms: 0,
            output_tokens: 5,
            chunk_delay_ms: 0,
            cached_tokens: 0,
            fail: None,
        }
    }

    async fn call(
        router: &Router,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-upstream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn data_events(text: &str) -> Vec<String> {
        text.split("\n\n")
            .filter_map(|e| {
                e.lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .map(str::to_string)
            })
            .collect()
    }

    #[tokio::test]
    async fn chat_completion_has_openai_shape_and_usage() {
        let router = app(defaults());
        let body =
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three"}]});
        let (status, _, text) = call(
            &router,
            "/v1/chat/completions",
            body,
            &[("x-mock-cached-tokens", "2")],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(
            v["usage"]["prompt_tokens"],
            3 + 3 + 3,
            "words + 3 per message + 3"
        );
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 14);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(v["choices"][0]["message"]["content"], wire::output_text(5));
    }

    #[tokio::test]
    async fn streaming_without_include_usage_sends_no_usage_chunk() {
        let router = app(defaults());
        let body =
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let (status, headers, text) = call(
            &router,
            "/v1/chat/completions",
            body,
            &[("x-mock-output-tokens", "3")],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/event-stream");
        let events = data_events(&text);
        assert_eq!(events.last().unwrap(), "[DONE]");
        assert_eq!(
            events.len(),
            1 + 3 + 1 + 1,
            "role, 3 tokens, finish, [DONE]"
        );
        assert!(!text.contains("usage"));
        let content: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(content, wire::output_text(3));
    }

    #[tokio::test]
    async fn streaming_with_include_usage_ends_with_a_usage_chunk() {
        let router = app(defaults());
        let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "hi there"}]});
        let (_, _, text) = call(
            &router,
            "/v1/chat/completions",
            body,
            &[("x-mock-input-tokens", "40")],
        )
        .await;
        let events = data_events(&text);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], 40);
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
        let first: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(
            first["usage"],
            Value::Null,
            "other chunks carry usage: null"
        );
    }

    #[tokio::test]
    async fn legacy_completions_stream_and_body() {
        let router = app(defaults());
        let (_, _, text) = call(
            &router,
            "/v1/completions",
            json!({"model": "m", "prompt": "a b c d"}),
            &[],
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        let body = json!({"model": "m", "prompt": "a", "stream": true, "stream_options": {"include_usage": true}});
        let (_, _, text) = call(&router, "/v1/completions", body, &[]).await;
        let events = data_events(&text);
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 5);
    }

    #[tokio::test]
    async fn embeddings_report_prompt_tokens_only() {
        let router = app(defaults());
        let (_, _, text) = call(
            &router,
            "/v1/embeddings",
            json!({"model": "e", "input": ["a b", "c"]}),
            &[],
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
    }

    #[tokio::test]
    async fn responses_api_body_and_stream_carry_usage() {
        let router = app(defaults());
        let (_, _, text) = call(
            &router,
            "/v1/responses",
            json!({"model": "m", "input": "x y"}),
            &[],
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "response");
        assert_eq!(v["usage"]["input_tokens"], 2);
        assert_eq!(v["usage"]["output_tokens"], 5);
        let (_, _, text) = call(
            &router,
            "/v1/responses",
            json!({"model": "m", "input": "x", "stream": true}),
            &[],
        )
        .await;
        assert!(!text.contains("[DONE]"));
        let last: Value = serde_json::from_str(data_events(&text).last().unwrap()).unwrap();
        assert_eq!(last["type"], "response.completed");
        assert_eq!(last["response"]["usage"]["output_tokens"], 5);
    }

    #[tokio::test]
    async fn output_stops_at_the_requests_limit() {
        let router = app(defaults());
        let chat = |limit: Value| json!({"model": "m", "messages": [], "max_tokens": limit});
        let (_, _, text) = call(&router, "/v1/chat/completions", chat(json!(3)), &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let (_, _, text) = call(&router, "/v1/chat/completions", chat(json!(10)), &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let body =
            json!({"model": "m", "messages": [], "max_completion_tokens": 2, "stream": true});
        let (_, _, text) = call(&router, "/v1/chat/completions", body, &[]).await;
        let events = data_events(&text);
        assert_eq!(
            events.len(),
            1 + 2 + 1 + 1,
            "role, 2 tokens, finish, [DONE]"
        );
        assert!(
            events[3].contains(r#""finish_reason":"length""#),
            "{}",
            events[3]
        );
        let body = json!({"model": "m", "input": "x", "max_output_tokens": 2});
        let (_, _, text) = call(&router, "/v1/responses", body, &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(v["usage"]["output_tokens"], 2);
        let body = json!({"model": "m", "prompt": "x", "max_tokens": 1, "stream": true});
        let (_, _, text) = call(&router, "/v1/completions", body, &[]).await;
        assert!(text.contains(r#""finish_reason":"length""#), "{text}");
    }

    #[tokio::test]
    async fn failures_by_header() {
        let router = app(defaults());
        let body = json!({"model": "m", "messages": []});
        let (status, _, text) = call(
            &router,
            "/v1/chat/completions",
            body.clone(),
            &[("x-mock-fail", "500")],
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
            "server_error"
        );
        let (status, headers, _) = call(
            &router,
            "/v1/chat/completions",
            body.clone(),
            &[("x-mock-fail", "429")],
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "1");
        let (status, _, _) = call(
            &router,
            "/v1/chat/completions",
            body.clone(),
            &[("x-mock-fail", "bogus")],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn disconnect_mid_stream_breaks_the_body() {
        let router = app(defaults());
        let body = json!({"model": "m", "stream": true, "messages": []});
        let req = Request::post("/v1/chat/completions")
            .header("x-mock-fail", "disconnect-mid-stream")
            .header("x-mock-output-tokens", "10")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut frames = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        assert!(err.is_some(), "the stream must end in an error");
        assert_eq!(frames, 1 + 5, "role chunk and half of the tokens");
    }

    #[tokio::test]
    async fn chunks_are_spaced_by_the_chunk_delay() {
        let router = app(defaults());
        let body = json!({"model": "m", "stream": true, "messages": []});
        let started = std::time::Instant::now();
        call(
            &router,
            "/v1/chat/completions",
            body,
            &[
                ("x-mock-chunk-delay-ms", "20"),
                ("x-mock-output-tokens", "4"),
            ],
        )
        .await;
        // role + 4 tokens + finish + [DONE] = 7 events, 6 gaps
        assert!(
            started.elapsed() >= Duration::from_millis(120),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn requests_are_recorded_without_auth_in_headers() {
        let router = app(defaults());
        call(
            &router,
            "/v1/chat/completions",
            json!({"model": "first", "messages": []}),
            &[("x-custom", "1")],
        )
        .await;
        call(
            &router,
            "/v1/embeddings",
            json!({"model": "second", "input": "a"}),
            &[],
        )
        .await;
        let resp = router
            .clone()
            .oneshot(Request::get("/_mock/requests").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["body"]["model"], "first");
        assert_eq!(list[0]["headers"]["x-custom"], "1");
        assert!(list[0]["headers"].get("authorization").is_none());
        assert_eq!(list[0]["authorization"], "Bearer sk-upstream");
        assert_eq!(list[1]["path"], "/v1/embeddings", "newest last");
        let resp = router
            .clone()
            .oneshot(
                Request::delete("/_mock/requests")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
}
