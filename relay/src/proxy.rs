//! One relayed request: parse and estimate, then a lifecycle task that admits, forwards,
//! and settles or refunds. The task is spawned so that a client hanging up never cancels a
//! reservation half-way: whatever happens to the connection, the task ends with exactly one
//! settle or refund (or, with `--fail-open` and the database away, with none, logged).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::app::AppState;
use crate::db::{self, AdmitArgs, DbError, RateLimit};
use crate::error::{error_chain, AppError};
use crate::estimate::{self, Endpoint, Tokenizer};
use crate::stream::{output_text_of_body, usage_from_json, SseFilter, Usage};

/// Bodies above this size are estimated on the blocking pool (BPE on megabytes takes a while).
const BLOCKING_ESTIMATE_BYTES: usize = 256 * 1024;
/// Largest non-streaming upstream body the relay will buffer.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// SSE events buffered between the upstream reader and a slow client.
const STREAM_BUFFER_EVENTS: usize = 32;
/// Backoff between settlement attempts: from the first, times four, at most the last.
const SETTLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
pub const CHANNEL_HEADER: &str = "x-pgq-channel-id";

/// Everything the lifecycle task needs. Not `Debug`: it carries the client's key.
struct Job {
    request_id: String,
    endpoint: Endpoint,
    api_key: String,
    channel_id: Option<i64>,
    model: String,
    body: Map<String, Value>,
    stream: bool,
    client_wants_usage: bool,
    est_input: i64,
    max_output: i64,
    /// client headers passed on to the upstream (see `forwarded_headers`)
    headers: HeaderMap,
}

/// Checks the request (auth, size, JSON, model), then hands it to a lifecycle task and
/// waits for the response that task produces.
pub async fn handle(
    state: AppState,
    endpoint: Endpoint,
    request_id: String,
    req: Request,
) -> Result<Response, AppError> {
    let api_key = bearer_token(req.headers())?;
    let channel_id = channel_header(req.headers())?;
    let headers = forwarded_headers(req.headers());
    let bytes = read_body(req, state.config.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        AppError::bad_request(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}."),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(AppError::bad_request(
            "invalid_json",
            "The request body must be a JSON object.",
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => {
            return Err(AppError::BadRequest {
                code: "missing_required_parameter",
                message: "You must provide a model parameter.".into(),
                param: Some("model"),
            })
        }
    };
    let stream = endpoint != Endpoint::Embeddings && body.get("stream") == Some(&Value::Bool(true));
    let client_wants_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        == Some(&Value::Bool(true));
    let body_value = Value::Object(body);
    let max_output = estimate::max_output_tokens(
        endpoint,
        &body_value,
        state.config.default_max_output_tokens,
    )?;
    let (est_input, body_value) = if bytes.len() > BLOCKING_ESTIMATE_BYTES {
        let model = model.clone();
        tokio::task::spawn_blocking(move || {
            (
                estimate::estimate_input_tokens(endpoint, &model, &body_value),
                body_value,
            )
        })
        .await
        .map_err(|_| AppError::Internal)?
    } else {
        (
            estimate::estimate_input_tokens(endpoint, &model, &body_value),
            body_value,
        )
    };
    let Value::Object(body) = body_value else {
        unreachable!("checked above")
    };

    let job = Job {
        request_id,
        endpoint,
        api_key,
        channel_id,
        model,
        body,
        stream,
        client_wants_usage,
        est_input,
        max_output,
        headers,
    };
    let (tx, rx) = oneshot::channel();
    state
        .tasks
        .spawn(lifecycle(state.clone(), job, tx).instrument(tracing::Span::current()));
    rx.await.map_err(|_| {
        tracing::error!("lifecycle task ended without a response");
        AppError::Internal
    })
}

/// `Authorization: Bearer <key>`; anything else is 401 before the database is asked.
pub fn bearer_token(headers: &HeaderMap) -> Result<String, AppError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(AppError::InvalidApiKey(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.".into(),
        ));
    };
    let garbled = || {
        AppError::InvalidApiKey(
            "Malformed Authorization header; expected 'Bearer YOUR_KEY'.".into(),
        )
    };
    let s = value.to_str().map_err(|_| garbled())?;
    let (scheme, token) = s.trim().split_once(' ').ok_or_else(garbled)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > 512
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(garbled());
    }
    Ok(token.to_string())
}

/// Client headers the upstream may see: `user-agent` and `x-*` extension headers (SDK
/// telemetry such as `x-stainless-*`, test controls such as `x-mock-*`), never credentials
/// (`authorization`, `x-api-key`, ...), the relay's own `x-pgq-*`, or hop-by-hop headers.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    const NEVER: &[&str] = &[
        "x-api-key",
        "x-goog-api-key",
        "x-request-id",
        "x-forwarded-for",
        "x-real-ip",
    ];
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let pass = n == "user-agent"
            || (n.starts_with("x-")
                && !n.starts_with("x-pgq-")
                && !NEVER.contains(&n)
                && !["key", "auth", "secret", "cookie", "password"]
                    .iter()
                    .any(|w| n.contains(w)));
        if pass {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn channel_header(headers: &HeaderMap) -> Result<Option<i64>, AppError> {
    let Some(v) = headers.get(CHANNEL_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| {
            AppError::bad_request(
                "invalid_channel_id",
                format!("Header {CHANNEL_HEADER} must be an integer channel id."),
            )
        })
}

async fn read_body(req: Request, limit: usize) -> Result<Bytes, AppError> {
    let too_large = AppError::PayloadTooLarge { limit };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
        Err(_) => Err(AppError::bad_request(
            "invalid_body",
            "The request body could not be read.",
        )),
    }
}

/// Where to send a request and as whom. Not `Debug`: it carries the upstream key.
struct Upstream {
    base_url: String,
    api_key: Option<String>,
    model: Option<String>,
}

/// What the relay does with the reservation once the upstream has answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Settle(Usage),
    Refund(&'static str),
}

/// Counts the in-flight gauge down however the task ends.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn lifecycle(state: AppState, job: Job, reply: oneshot::Sender<Response>) {
    let label = job.endpoint.label();
    let started = Instant::now();
    let admitted = db::admit(
        &state.pool,
        &AdmitArgs {
            api_key: &job.api_key,
            request_id: &job.request_id,
            model: &job.model,
            est_input_tokens: job.est_input,
            max_output_tokens: job.max_output,
            channel_id: job.channel_id,
        },
    )
    .await;
    state
        .metrics
        .admit_seconds
        .with_label_values(&[if admitted.is_ok() { "ok" } else { "error" }])
        .observe(started.elapsed().as_secs_f64());

    let admission = match admitted {
        Ok(a) => a,
        Err(DbError::Unavailable(cause)) if state.config.fail_open => {
            tracing::warn!(
                request_id = %job.request_id,
                %cause,
                "quota database unavailable: forwarding WITHOUT quota accounting (--fail-open)"
            );
            return forward_unaccounted(state, job, reply).await;
        }
        Err(e) => {
            if matches!(e, DbError::Unavailable(_)) {
                tracing::error!(error = %e, "admit failed: quota database unavailable, refusing (fail closed)");
            }
            let err = AppError::from(e);
            state.metrics.request(label, err.outcome());
            let _ = reply.send(err.into_response());
            return;
        }
    };
    let span = tracing::Span::current();
    for (field, value) in [
        ("key_id", admission.key_id),
        ("user_id", admission.user_id),
        ("channel_id", admission.channel_id),
    ] {
        if let Some(v) = value {
            span.record(field, v);
        }
    }
    let ratelimit = admission.ratelimit.clone();

    if !admission.allowed {
        let status = admission
            .http_status
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::FORBIDDEN);
        let err = AppError::Denied {
            status,
            code: admission
                .error_code
                .unwrap_or_else(|| "request_denied".into()),
            message: admission
                .message
                .unwrap_or_else(|| "This request was denied.".into()),
            retry_after_s: admission.retry_after_s,
        };
        tracing::info!(
            status = status.as_u16(),
            code = err.code().as_deref().unwrap_or(""),
            "admit denied the request"
        );
        state.metrics.request(label, err.outcome());
        let mut response = err.into_response();
        ratelimit_headers(&ratelimit, response.headers_mut());
        let _ = reply.send(response);
        return;
    }

    let _in_flight = InFlight::new(&state.metrics.reservations_in_flight);
    // a channel's own upstream gets only its own key: the default key goes to the default URL
    let upstream = match admission.upstream_base_url {
        Some(base_url) => Some(Upstream {
            base_url,
            api_key: admission.upstream_api_key,
            model: admission.upstream_model,
        }),
        None => state.config.upstream_url.clone().map(|base_url| Upstream {
            base_url,
            api_key: admission
                .upstream_api_key
                .or_else(|| state.config.upstream_api_key.clone()),
            model: admission.upstream_model,
        }),
    };
    let Some(upstream) = upstream else {
        tracing::error!("admit named no upstream and --upstream-url is not set");
        settle_or_refund(
            &state,
            &job.request_id,
            Outcome::Refund("no_upstream_configured"),
        )
        .await;
        let err = AppError::UpstreamUnavailable("no upstream is configured for this request");
        state.metrics.request(label, err.outcome());
        let _ = reply.send(err.into_response());
        return;
    };
    match call_upstream(&state, &job, &upstream, true).await {
        Err((err, reason)) => {
            settle_or_refund(&state, &job.request_id, Outcome::Refund(reason)).await;
            state.metrics.request(label, err.outcome());
            let mut response = err.into_response();
            ratelimit_headers(&ratelimit, response.headers_mut());
            let _ = reply.send(response);
        }
        Ok(UpstreamReply::Complete {
            status,
            content_type,
            body,
            usage,
        }) => {
            state.metrics.request(label, "ok");
            let mut response = complete_response(status, content_type, body);
            ratelimit_headers(&ratelimit, response.headers_mut());
            let _ = reply.send(response);
            // After the reply: the client never waits for the ledger, and this task outlives it.
            settle_or_refund(&state, &job.request_id, Outcome::Settle(usage)).await;
        }
        Ok(UpstreamReply::Stream(upstream_response)) => {
            let hide = job.endpoint.supports_include_usage() && !job.client_wants_usage;
            let (tx, rx) = mpsc::channel(STREAM_BUFFER_EVENTS);
            let mut response = stream_response(rx);
            ratelimit_headers(&ratelimit, response.headers_mut());
            if reply.send(response).is_err() {
                tracing::info!("client left before the stream started");
            }
            let mut filter = SseFilter::new(hide);
            let end = pump(upstream_response, tx, &mut filter).await;
            let outcome = stream_outcome(
                end,
                &filter,
                job.est_input,
                Tokenizer::for_model(&job.model),
            );
            tracing::info!(?end, ?outcome, "stream finished");
            state.metrics.request(
                label,
                if matches!(outcome, Outcome::Refund(_)) {
                    "upstream_error"
                } else {
                    "ok"
                },
            );
            settle_or_refund(&state, &job.request_id, outcome).await;
        }
    }
}

/// `--fail-open` with the database away: forward as the client asked, no admit, no settle.
async fn forward_unaccounted(state: AppState, job: Job, reply: oneshot::Sender<Response>) {
    let label = job.endpoint.label();
    state.metrics.request(label, "fail_open");
    let Some(base_url) = state.config.upstream_url.clone() else {
        let _ = reply.send(AppError::DatabaseUnavailable.into_response());
        return;
    };
    let upstream = Upstream {
        base_url,
        api_key: state.config.upstream_api_key.clone(),
        model: None,
    };
    let mut response = match call_upstream(&state, &job, &upstream, false).await {
        Err((err, _)) => err.into_response(),
        Ok(UpstreamReply::Complete {
            status,
            content_type,
            body,
            ..
        }) => complete_response(status, content_type, body),
        Ok(UpstreamReply::Stream(upstream_response)) => {
            let (tx, rx) = mpsc::channel(STREAM_BUFFER_EVENTS);
            let response = stream_response(rx);
            tokio::spawn(
                async move {
                    let mut filter = SseFilter::new(false);
                    pump(upstream_response, tx, &mut filter).await;
                }
                .in_current_span(),
            );
            response
        }
    };
    response
        .headers_mut()
        .insert("x-pgq-accounting", HeaderValue::from_static("off"));
    let _ = reply.send(response);
}

enum UpstreamReply {
    Complete {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
        usage: Usage,
    },
    Stream(reqwest::Response),
}

/// Sends the request upstream. On failure returns the client's error and the refund reason.
/// `accounting`: the relay will settle, so it asks a streaming upstream for usage.
async fn call_upstream(
    state: &AppState,
    job: &Job,
    upstream: &Upstream,
    accounting: bool,
) -> Result<UpstreamReply, (AppError, &'static str)> {
    let mut body = job.body.clone();
    if let Some(model) = &upstream.model {
        body.insert("model".into(), Value::String(model.clone()));
    }
    if accounting && job.stream && job.endpoint.supports_include_usage() && !job.client_wants_usage
    {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        options
            .as_object_mut()
            .expect("made an object above")
            .insert("include_usage".into(), Value::Bool(true));
    }
    let url = format!(
        "{}{}",
        upstream.base_url.trim_end_matches('/'),
        job.endpoint.upstream_path()
    );
    let payload = serde_json::to_vec(&body).map_err(|_| (AppError::Internal, "relay_error"))?;
    let mut request = state
        .http
        .post(&url)
        .headers(job.headers.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", &job.request_id)
        .body(payload);
    if job.stream {
        request = request.header(header::ACCEPT, "text/event-stream");
    }
    if let Some(key) = &upstream.api_key {
        request = request.bearer_auth(key);
    }

    let started = Instant::now();
    let sent = request.send().await;
    state
        .metrics
        .upstream_seconds
        .with_label_values(&[job.endpoint.label()])
        .observe(started.elapsed().as_secs_f64());
    let response = sent.map_err(|e| {
        let e = e.without_url();
        tracing::warn!(error = %error_chain(&e), "upstream request failed");
        if e.is_timeout() {
            (AppError::UpstreamTimeout, "upstream_timeout")
        } else {
            (
                AppError::UpstreamUnavailable("the upstream could not be reached"),
                "upstream_unreachable",
            )
        }
    })?;

    let status = response.status();
    if !status.is_success() {
        return Err(upstream_error(status, response).await);
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_sse {
        return Ok(UpstreamReply::Stream(response));
    }

    let body = read_upstream_body(response).await?;
    let parsed: Value = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(
            status = status.as_u16(),
            "upstream sent a body that is not JSON"
        );
        (
            AppError::UpstreamUnavailable("the upstream sent an invalid response"),
            "upstream_protocol_error",
        )
    })?;
    let usage = usage_from_json(&parsed).unwrap_or_else(|| {
        let mut text = String::new();
        output_text_of_body(&parsed, &mut text);
        let estimated = Usage {
            input_tokens: job.est_input,
            output_tokens: Tokenizer::for_model(&job.model).count(&text),
            cached_tokens: 0,
        };
        tracing::warn!(
            ?estimated,
            "upstream response has no usage; settling the relay's count"
        );
        estimated
    });
    Ok(UpstreamReply::Complete {
        status,
        content_type,
        body,
        usage,
    })
}

async fn read_upstream_body(
    response: reqwest::Response,
) -> Result<Bytes, (AppError, &'static str)> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            let e = e.without_url();
            tracing::warn!(error = %error_chain(&e), "reading the upstream body failed");
            if e.is_timeout() {
                (AppError::UpstreamTimeout, "upstream_timeout")
            } else {
                (
                    AppError::UpstreamUnavailable("the upstream response was cut off"),
                    "upstream_protocol_error",
                )
            }
        })?;
        if body.len() + chunk.len() > MAX_UPSTREAM_BODY {
            return Err((
                AppError::UpstreamUnavailable("the upstream response is too large"),
                "upstream_protocol_error",
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// An upstream non-2xx: request errors (4xx) are passed on in OpenAI's shape, except auth
/// failures (the client's key is fine; the relay's is not) which become 502 like 5xx.
async fn upstream_error(
    status: StatusCode,
    response: reqwest::Response,
) -> (AppError, &'static str) {
    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
    let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let error_object = serde_json::from_slice::<Value>(&body[..body.len().min(64 * 1024)])
        .ok()
        .and_then(|v| v.get("error").cloned())
        .filter(Value::is_object);
    tracing::warn!(status = status.as_u16(), "upstream answered with an error");
    match status.as_u16() {
        401 | 403 => {
            tracing::error!(
                status = status.as_u16(),
                "the upstream refused the relay's credentials"
            );
            (
                AppError::UpstreamUnavailable("the upstream refused the relay's credentials"),
                "upstream_auth_failed",
            )
        }
        400..=499 => {
            let error = error_object.unwrap_or_else(|| {
                json!({
                    "message": format!("The upstream rejected the request (HTTP {}).", status.as_u16()),
                    "type": crate::error::error_type(status),
                    "param": null,
                    "code": if status == StatusCode::TOO_MANY_REQUESTS { "upstream_rate_limited" } else { "upstream_rejected" },
                })
            });
            let reason = if status == StatusCode::TOO_MANY_REQUESTS {
                "upstream_rate_limited"
            } else {
                "upstream_rejected"
            };
            (
                AppError::UpstreamRejected {
                    status,
                    error,
                    retry_after,
                },
                reason,
            )
        }
        _ => (
            AppError::UpstreamUnavailable("the upstream failed"),
            "upstream_error",
        ),
    }
}

fn complete_response(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    response
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream closed the stream normally.
    Completed,
    /// The upstream failed mid-stream (error, cut connection, timeout).
    UpstreamFailed,
    /// The client went away; the upstream is not read any further.
    ClientGone,
}

/// Moves whole SSE events from the upstream to the client until either side stops.
async fn pump(
    upstream: reqwest::Response,
    tx: mpsc::Sender<Bytes>,
    filter: &mut SseFilter,
) -> StreamEnd {
    let mut chunks = upstream.bytes_stream();
    loop {
        let next = tokio::select! {
            biased;
            _ = tx.closed() => return StreamEnd::ClientGone,
            next = chunks.next() => next,
        };
        match next {
            Some(Ok(bytes)) => {
                for event in filter.push(&bytes) {
                    if tx.send(event).await.is_err() {
                        return StreamEnd::ClientGone;
                    }
                }
            }
            Some(Err(e)) => {
                let e = e.without_url();
                tracing::warn!(error = %error_chain(&e), timeout = e.is_timeout(), "upstream stream failed");
                let error = json!({"error": {
                    "message": if e.is_timeout() { "The upstream did not finish in time." } else { "The upstream stream was interrupted." },
                    "type": "server_error",
                    "param": null,
                    "code": if e.is_timeout() { "upstream_timeout" } else { "upstream_unavailable" },
                }});
                let _ = tx.send(Bytes::from(format!("data: {error}\n\n"))).await;
                return StreamEnd::UpstreamFailed;
            }
            None => {
                if let Some(rest) = filter.finish() {
                    let _ = tx.send(rest).await;
                }
                return StreamEnd::Completed;
            }
        }
    }
}

/// What a finished stream costs: the upstream's usage when it sent one; otherwise the estimated
/// input plus the output counted so far. A stream that failed upstream before producing
/// anything is refunded; a client who left is charged for what was produced.
fn stream_outcome(
    end: StreamEnd,
    filter: &SseFilter,
    est_input: i64,
    tokenizer: Tokenizer,
) -> Outcome {
    if let Some(usage) = filter.usage {
        return Outcome::Settle(usage);
    }
    if end == StreamEnd::UpstreamFailed && filter.content_events == 0 {
        return Outcome::Refund("upstream_stream_failed");
    }
    Outcome::Settle(Usage {
        input_tokens: est_input,
        output_tokens: tokenizer.count(&filter.text),
        cached_tokens: 0,
    })
}

/// Settle or refund, retrying transient failures (database unreachable, a conflict) with
/// backoff for `--settle-retry-s`. A settle that arrives after the sweep released the
/// reservation is still charged by the engine, and a repeated call changes nothing, so retrying
/// is always safe. Given up, the request is never charged: logged at ERROR and counted.
async fn settle_or_refund(
    state: &AppState,
    request_id: &str,
    outcome: Outcome,
) -> Option<db::Settlement> {
    let call = match outcome {
        Outcome::Settle(_) => "settle",
        Outcome::Refund(_) => "refund",
    };
    let (mut delay, max_delay) = SETTLE_BACKOFF;
    let give_up = Instant::now() + state.config.settle_retry;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = match outcome {
            Outcome::Settle(u) => db::settle(
                &state.pool,
                request_id,
                u.input_tokens,
                u.output_tokens,
                u.cached_tokens,
            )
            .await
            .map(Some),
            Outcome::Refund(reason) => {
                db::refund(&state.pool, request_id, reason)
                    .await
                    .map(|refunded| {
                        tracing::info!(reason, refunded, "reservation refunded");
                        None
                    })
            }
        };
        state
            .metrics
            .settle_seconds
            .with_label_values(&[call])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(settlement) => {
                if let Some(s) = &settlement {
                    tracing::info!(
                        settled = s.settled,
                        billed = s.billed,
                        unbilled_reason = s.unbilled_reason.as_deref().unwrap_or(""),
                        cost = s.cost.as_deref().unwrap_or(""),
                        replay = s.replay,
                        "reservation settled"
                    );
                }
                return settlement;
            }
            Err(e) if e.is_transient() && Instant::now() + delay < give_up => {
                tracing::warn!(call, attempt, error = %e, "settlement failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 4).min(max_delay);
            }
            Err(e) => {
                state
                    .metrics
                    .settlement_failures
                    .with_label_values(&[call])
                    .inc();
                tracing::error!(
                    call,
                    attempt,
                    error = %e,
                    ?outcome,
                    "SETTLEMENT LOST: the reservation stays until quota.sweep() releases it"
                );
                return None;
            }
        }
    }
}

/// `x-ratelimit-{limit,remaining,reset}-<metric>` for the tightest window.
fn ratelimit_headers(rl: &RateLimit, headers: &mut HeaderMap) {
    let Some(metric) = rl.metric.as_deref() else {
        return;
    };
    let metric = metric.to_ascii_lowercase();
    if metric.is_empty()
        || !metric
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return;
    }
    let mut put = |what: &str, value: String| {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("x-ratelimit-{what}-{metric}").as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    };
    if let Some(limit) = &rl.limit {
        put("limit", limit.clone());
    }
    if let Some(remaining) = &rl.remaining {
        put("remaining", remaining.clone());
    }
    if let Some(reset) = rl.reset_s {
        put("reset", reset_duration(reset.max(0)));
    }
}

/// A time until reset as OpenAI writes it in `x-ratelimit-reset-*` (Go's duration format:
/// `45s`, `6m0s`, `1h30m0s`), so clients written for OpenAI's headers read ours.
fn reset_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

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
        Err(DbError::Unavailable(cause)) if state.config.fail_open => {
            tracing::warn!(%request_id, %cause, "quota database unavailable: listing the upstream's models WITHOUT key check (--fail-open)");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::test_relay;

    fn job(
        endpoint: Endpoint,
        body: Value,
        client_headers: &[(&'static str, &'static str)],
    ) -> Job {
        let mut headers = HeaderMap::new();
        for (k, v) in client_headers {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let Value::Object(body) = body else {
            panic!("object")
        };
        Job {
            request_id: "req_test".into(),
            endpoint,
            api_key: "sk-client".into(),
            channel_id: None,
            model: body["model"].as_str().unwrap().into(),
            stream: body.get("stream") == Some(&Value::Bool(true)),
            client_wants_usage: body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                == Some(&Value::Bool(true)),
            body,
            est_input: 10,
            max_output: 100,
            headers,
        }
    }

    fn upstream(base: &str, model: Option<&str>) -> Upstream {
        Upstream {
            base_url: format!("{base}/v1"),
            api_key: Some("sk-channel".into()),
            model: model.map(str::to_string),
        }
    }

    async fn drain(mut rx: mpsc::Receiver<Bytes>) -> String {
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn a_settlement_is_retried_for_settle_retry_then_given_up_and_counted() {
        // the test relay's database refuses connections; it retries settlements for 1 s
        let state = test_relay(false, None, Duration::from_secs(10));
        let started = Instant::now();
        let usage = Usage {
            input_tokens: 1,
            output_tokens: 1,
            cached_tokens: 0,
        };
        assert!(settle_or_refund(&state, "req_x", Outcome::Settle(usage))
            .await
            .is_none());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let failures = state
            .metrics
            .settlement_failures
            .with_label_values(&["settle"])
            .get();
        assert_eq!(failures, 1);
    }

    #[tokio::test]
    async fn streaming_asks_for_usage_hides_it_and_captures_it() {
        let mock = crate::mock::spawn_for_tests(4).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::ChatCompletions,
            json!({"model": "alias", "stream": true, "messages": [{"role": "user", "content": "a b"}]}),
            &[("x-mock-input-tokens", "21"), ("x-mock-cached-tokens", "5")],
        );
        let Ok(UpstreamReply::Stream(resp)) =
            call_upstream(&state, &j, &upstream(&mock, Some("real-model")), true).await
        else {
            panic!("expected a stream");
        };
        let (tx, rx) = mpsc::channel(4);
        let client = tokio::spawn(drain(rx));
        let mut filter = SseFilter::new(true);
        assert_eq!(pump(resp, tx, &mut filter).await, StreamEnd::Completed);
        let shown = client.await.unwrap();
        assert!(shown.ends_with("data: [DONE]\n\n"));
        assert!(
            !shown.contains("\"prompt_tokens\""),
            "the usage chunk is not shown: {shown}"
        );
        assert_eq!(
            filter.usage,
            Some(Usage {
                input_tokens: 21,
                output_tokens: 4,
                cached_tokens: 5
            })
        );

        let seen = crate::mock::requests_seen(&mock).await.pop().unwrap();
        assert_eq!(seen["body"]["stream_options"]["include_usage"], true);
        assert_eq!(
            seen["body"]["model"], "real-model",
            "upstream_model replaces the client's model"
        );
        assert_eq!(seen["authorization"], "Bearer sk-channel");
        assert_eq!(seen["headers"]["x-request-id"], "req_test");
    }

    #[tokio::test]
    async fn non_streaming_usage_comes_from_the_body() {
        let mock = crate::mock::spawn_for_tests(4).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::Responses,
            json!({"model": "m", "input": "a b c"}),
            &[],
        );
        let Ok(UpstreamReply::Complete { status, usage, .. }) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a body");
        };
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            usage,
            Usage {
                input_tokens: 3,
                output_tokens: 4,
                cached_tokens: 0
            }
        );
        let j = job(
            Endpoint::Embeddings,
            json!({"model": "e", "input": "a b"}),
            &[],
        );
        let Ok(UpstreamReply::Complete { usage, .. }) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a body");
        };
        assert_eq!(
            usage,
            Usage {
                input_tokens: 2,
                output_tokens: 0,
                cached_tokens: 0
            }
        );
    }

    #[tokio::test]
    async fn upstream_failures_map_to_refund_reasons() {
        let mock = crate::mock::spawn_for_tests(4).await;
        let state = test_relay(false, None, Duration::from_millis(300));
        let body = json!({"model": "m", "messages": []});
        for (fail, status, reason) in [
            ("500", 502, "upstream_error"),
            ("503", 502, "upstream_error"),
            ("401", 502, "upstream_auth_failed"),
            ("400", 400, "upstream_rejected"),
            ("429", 429, "upstream_rate_limited"),
            ("timeout", 504, "upstream_timeout"),
        ] {
            let j = job(
                Endpoint::ChatCompletions,
                body.clone(),
                &[("x-mock-fail", fail)],
            );
            let Err((err, why)) = call_upstream(&state, &j, &upstream(&mock, None), true).await
            else {
                panic!("{fail} must fail");
            };
            assert_eq!(
                (err.status_code().as_u16(), why),
                (status, reason),
                "{fail}"
            );
        }
        let unreachable = Upstream {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: None,
            model: None,
        };
        let j = job(Endpoint::ChatCompletions, body, &[]);
        let Err((err, why)) = call_upstream(&state, &j, &unreachable, true).await else {
            panic!()
        };
        assert_eq!(
            (err.status_code().as_u16(), why),
            (502, "upstream_unreachable")
        );
    }

    #[tokio::test]
    async fn client_hanging_up_stops_the_pump_with_what_was_produced() {
        let mock = crate::mock::spawn_for_tests(50).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::ChatCompletions,
            json!({"model": "gpt-4o", "stream": true, "messages": []}),
            &[("x-mock-chunk-delay-ms", "20")],
        );
        let Ok(UpstreamReply::Stream(resp)) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a stream");
        };
        let (tx, mut rx) = mpsc::channel(1);
        let client = tokio::spawn(async move {
            for _ in 0..4 {
                rx.recv().await.unwrap();
            }
            // then the client leaves
        });
        let mut filter = SseFilter::new(true);
        let started = Instant::now();
        assert_eq!(pump(resp, tx, &mut filter).await, StreamEnd::ClientGone);
        client.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "the upstream is not drained"
        );
        assert!(filter.usage.is_none());
        let Outcome::Settle(u) =
            stream_outcome(StreamEnd::ClientGone, &filter, 10, Tokenizer::O200k)
        else {
            panic!()
        };
        assert!(u.output_tokens >= 3 && u.output_tokens < 50, "{u:?}");
        assert_eq!(u.input_tokens, 10);
    }

    #[tokio::test]
    async fn upstream_cut_mid_stream_tells_the_client_and_counts_output() {
        let mock = crate::mock::spawn_for_tests(8).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::ChatCompletions,
            json!({"model": "gpt-4o", "stream": true, "messages": []}),
            &[("x-mock-fail", "disconnect-mid-stream")],
        );
        let Ok(UpstreamReply::Stream(resp)) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a stream");
        };
        let (tx, rx) = mpsc::channel(4);
        let client = tokio::spawn(drain(rx));
        let mut filter = SseFilter::new(true);
        assert_eq!(pump(resp, tx, &mut filter).await, StreamEnd::UpstreamFailed);
        let shown = client.await.unwrap();
        assert!(
            shown.trim_end().ends_with("}}"),
            "ends with an error event: {shown}"
        );
        assert!(shown.contains("upstream_unavailable"));
        assert_eq!(filter.text, crate::mock::wire::output_text(4));
        assert!(matches!(
            stream_outcome(StreamEnd::UpstreamFailed, &filter, 10, Tokenizer::O200k),
            Outcome::Settle(_)
        ));
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token(&headers("Bearer sk-abc")).unwrap(), "sk-abc");
        assert_eq!(bearer_token(&headers("bearer  sk-abc ")).unwrap(), "sk-abc");
        for bad in ["sk-abc", "Basic dXNlcjpwYXNz", "Bearer ", "Bearer a b"] {
            let e = bearer_token(&headers(bad)).unwrap_err();
            assert_eq!(e.status_code(), 401, "{bad}");
        }
        assert_eq!(
            bearer_token(&HeaderMap::new()).unwrap_err().status_code(),
            401
        );
    }

    #[test]
    fn only_harmless_client_headers_reach_the_upstream() {
        let mut h = headers("Bearer sk-client");
        for (k, v) in [
            ("x-mock-output-tokens", "3"),
            ("x-stainless-lang", "python"),
            ("user-agent", "OpenAI/Python"),
            ("x-api-key", "sk-client"),
            ("x-pgq-channel-id", "7"),
            ("cookie", "a=b"),
            ("x-upstream-secret", "t"),
            ("x-mock-cached-tokens", "2"),
            ("connection", "keep-alive"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded_headers(&h);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "user-agent",
                "x-mock-cached-tokens",
                "x-mock-output-tokens",
                "x-stainless-lang"
            ]
        );
    }

    #[test]
    fn stream_outcomes_charge_what_was_produced() {
        let tok = Tokenizer::Approx;
        // usage chunk wins, whatever happened to the connection
        let mut f = SseFilter::new(true);
        f.push(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
        );
        assert_eq!(
            stream_outcome(StreamEnd::ClientGone, &f, 100, tok),
            Outcome::Settle(Usage {
                input_tokens: 5,
                output_tokens: 2,
                cached_tokens: 0
            })
        );
        // client left after some content: estimated input + counted output, never a refund
        let mut f = SseFilter::new(true);
        f.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\n");
        assert_eq!(
            stream_outcome(StreamEnd::ClientGone, &f, 100, tok),
            Outcome::Settle(Usage {
                input_tokens: 100,
                output_tokens: 2,
                cached_tokens: 0
            })
        );
        // upstream failed after content: still charged
        assert_eq!(
            stream_outcome(StreamEnd::UpstreamFailed, &f, 100, tok),
            Outcome::Settle(Usage {
                input_tokens: 100,
                output_tokens: 2,
                cached_tokens: 0
            })
        );
        // upstream failed before any content: refunded
        let empty = SseFilter::new(true);
        assert_eq!(
            stream_outcome(StreamEnd::UpstreamFailed, &empty, 100, tok),
            Outcome::Refund("upstream_stream_failed")
        );
        // client left before any content: the input was still processed
        assert_eq!(
            stream_outcome(StreamEnd::ClientGone, &empty, 100, tok),
            Outcome::Settle(Usage {
                input_tokens: 100,
                output_tokens: 0,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn ratelimit_headers_name_the_metric() {
        let mut h = HeaderMap::new();
        ratelimit_headers(
            &RateLimit {
                metric: Some("cost".into()),
                limit: Some("10.00".into()),
                remaining: Some("7.25".into()),
                reset_s: Some(3600),
            },
            &mut h,
        );
        assert_eq!(h["x-ratelimit-limit-cost"], "10.00");
        assert_eq!(h["x-ratelimit-remaining-cost"], "7.25");
        assert_eq!(h["x-ratelimit-reset-cost"], "1h0m0s");
        let mut h = HeaderMap::new();
        ratelimit_headers(
            &RateLimit {
                metric: None,
                limit: Some("1".into()),
                ..Default::default()
            },
            &mut h,
        );
        ratelimit_headers(
            &RateLimit {
                metric: Some("bad metric\n".into()),
                limit: Some("1".into()),
                ..Default::default()
            },
            &mut h,
        );
        assert!(h.is_empty());
    }

    #[test]
    fn reset_times_read_as_openai_writes_them() {
        for (seconds, written) in [
            (0, "0s"),
            (45, "45s"),
            (60, "1m0s"),
            (360, "6m0s"),
            (3599, "59m59s"),
            (3600, "1h0m0s"),
            (5400, "1h30m0s"),
            (90061, "25h1m1s"),
        ] {
            assert_eq!(reset_duration(seconds), written, "{seconds} s");
        }
    }
}
