//! The upstream call: the request as the upstream gets it (its model name, its key, usage
//! asked for), the answer read back, and upstream errors mapped to the client's.

use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use crate::error::{error_chain, AppError};
use crate::estimate::Tokenizer;
use crate::openai::{output_text_of_body, usage_from_json, Usage};
use crate::proxy::ingress::Job;
use crate::proxy::settlement::Outcome;
use crate::state::AppState;

/// Largest non-streaming upstream body the relay will buffer.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// Where to send a request and as whom. Not `Debug`: it carries the upstream key.
pub struct Upstream {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: Option<String>,
}

pub enum UpstreamReply {
    Complete {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
        usage: Usage,
    },
    Stream(reqwest::Response),
}

/// An upstream call without a usable answer: what the client is told, and what the request
/// costs. Only a request the upstream never received (connection refused, DNS, TLS), or one it
/// answered with an error and no usage, is refunded; once it was sent, an unknown outcome
/// (timeout, connection lost, a broken answer) is charged at its reservation.
pub struct Failure {
    pub error: AppError,
    pub outcome: Outcome,
}

impl Failure {
    fn refund(error: AppError, reason: &'static str) -> Self {
        Failure {
            error,
            outcome: Outcome::Refund(reason.into()),
        }
    }

    fn charge_reservation(error: AppError, job: &Job, why: &str) -> Self {
        tracing::warn!(
            why,
            "the upstream may have billed this request: charging its reservation"
        );
        Failure {
            error,
            outcome: Outcome::Settle(job.reservation()),
        }
    }
}

/// Sends the request upstream. `accounting`: the relay will settle, so it asks a streaming
/// upstream for usage.
pub async fn call_upstream(
    state: &AppState,
    job: &Job,
    upstream: &Upstream,
    accounting: bool,
) -> Result<UpstreamReply, Failure> {
    let mut body = job.body.clone();
    if let Some(model) = &upstream.model {
        body.insert("model".into(), Value::String(model.clone()));
    }
    // the output reserved is the most the upstream may write: tell it when the client did not
    let model = upstream.model.as_deref().unwrap_or(&job.model);
    if let (Some(cap), Some(field)) = (job.output_cap, job.endpoint.output_limit_field(model)) {
        body.insert(field.into(), Value::from(cap));
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
    let payload = serde_json::to_vec(&body)
        .map_err(|_| Failure::refund(AppError::Internal, "relay_error"))?;
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
        if e.is_connect() {
            // nothing was sent: nothing to pay for
            let error = if e.is_timeout() {
                AppError::UpstreamTimeout
            } else {
                AppError::UpstreamUnavailable("the upstream could not be reached")
            };
            Failure::refund(error, "upstream_unreachable")
        } else if e.is_timeout() {
            Failure::charge_reservation(AppError::UpstreamTimeout, job, "upstream timeout")
        } else {
            let error = AppError::UpstreamUnavailable("the upstream connection was lost");
            Failure::charge_reservation(error, job, "upstream connection lost")
        }
    })?;

    let status = response.status();
    if !status.is_success() {
        return Err(upstream_error(status, response, job, upstream).await);
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_sse {
        return Ok(UpstreamReply::Stream(response));
    }

    let body = read_upstream_body(response, job).await?;
    let parsed: Value = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(
            status = status.as_u16(),
            "upstream sent a body that is not JSON"
        );
        let error = AppError::UpstreamUnavailable("the upstream sent an invalid response");
        Failure::charge_reservation(error, job, "invalid upstream body")
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

async fn read_upstream_body(response: reqwest::Response, job: &Job) -> Result<Bytes, Failure> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            let e = e.without_url();
            tracing::warn!(error = %error_chain(&e), "reading the upstream body failed");
            let error = if e.is_timeout() {
                AppError::UpstreamTimeout
            } else {
                AppError::UpstreamUnavailable("the upstream response was cut off")
            };
            Failure::charge_reservation(error, job, "upstream body cut off")
        })?;
        if body.len() + chunk.len() > MAX_UPSTREAM_BODY {
            let error = AppError::UpstreamUnavailable("the upstream response is too large");
            return Err(Failure::charge_reservation(
                error,
                job,
                "upstream body too large",
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// An upstream non-2xx, as the client sees it. The upstream's own body speaks for the relay's
/// account, so it is passed on only for request errors the client can fix (400, 404, 422),
/// in the client's terms (its model name, no organization, project or key ids). Refused
/// credentials (401/403) are the relay's problem: 502 `upstream_auth_failed`. The upstream's
/// rate limit (429) is the relay's own `upstream_rate_limited`, with the upstream's
/// `Retry-After`. Anything else: `upstream_rejected` (4xx) or 502 (5xx). Refunded unless the
/// body reports usage, which is then settled.
async fn upstream_error(
    status: StatusCode,
    response: reqwest::Response,
    job: &Job,
    upstream: &Upstream,
) -> Failure {
    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
    let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&body[..body.len().min(64 * 1024)]).ok();
    tracing::warn!(status = status.as_u16(), "upstream answered with an error");
    let (error, reason) = match status.as_u16() {
        401 | 403 => {
            tracing::error!(
                status = status.as_u16(),
                "the upstream refused the relay's credentials"
            );
            (AppError::UpstreamAuthFailed, "upstream_auth_failed")
        }
        429 => (
            AppError::UpstreamRateLimited { retry_after },
            "upstream_rate_limited",
        ),
        400 | 404 | 422 => {
            let error = parsed
                .as_ref()
                .and_then(|v| v.get("error"))
                .filter(|e| e.is_object())
                .map(|e| in_clients_terms(e.clone(), upstream.model.as_deref(), &job.model))
                .unwrap_or_else(|| rejected(status));
            let error = AppError::UpstreamRejected {
                status,
                error,
                retry_after: None,
            };
            (error, "upstream_rejected")
        }
        400..=499 => {
            let error = AppError::UpstreamRejected {
                status,
                error: rejected(status),
                retry_after: None,
            };
            (error, "upstream_rejected")
        }
        _ => (
            AppError::UpstreamUnavailable("the upstream failed"),
            "upstream_error",
        ),
    };
    match parsed.as_ref().and_then(usage_from_json) {
        Some(usage) => Failure {
            error,
            outcome: Outcome::Settle(usage),
        },
        None => Failure::refund(error, reason),
    }
}

/// The relay's own error object for an upstream 4xx whose body is not passed on.
fn rejected(status: StatusCode) -> Value {
    json!({
        "message": format!("The upstream rejected the request (HTTP {}).", status.as_u16()),
        "type": crate::openai::error_type(status),
        "param": null,
        "code": "upstream_rejected",
    })
}

/// An upstream error object with the upstream's model name replaced by the client's, and the
/// ids of the relay's account (`org-…`, `proj_…`, `sk-…`) removed, in every string it holds.
fn in_clients_terms(error: Value, upstream_model: Option<&str>, client_model: &str) -> Value {
    match error {
        Value::String(s) => {
            let s = match upstream_model {
                Some(m) if !m.is_empty() && m != client_model => s.replace(m, client_model),
                _ => s,
            };
            Value::String(without_account_ids(&s))
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| in_clients_terms(v, upstream_model, client_model))
                .collect(),
        ),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, in_clients_terms(v, upstream_model, client_model)))
                .collect(),
        ),
        other => other,
    }
}

/// `text` with every word that starts like an account id (`org-`, `proj_`, `sk-`) redacted.
fn without_account_ids(text: &str) -> String {
    const PREFIXES: &[&str] = &["org-", "proj_", "sk-"];
    let id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((i, _)) = rest.char_indices().find(|&(i, _)| {
        let at_word_start = rest[..i].chars().next_back().is_none_or(|c| !id_char(c));
        at_word_start && PREFIXES.iter().any(|p| rest[i..].starts_with(p))
    }) {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find(|c: char| !id_char(c))
            .map_or(rest.len(), |n| i + n);
        out.push_str("[redacted]");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

pub fn complete_response(
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

/// The mock at `base` as an upstream with a key of its own, for tests.
#[cfg(test)]
pub fn test_upstream(base: &str, model: Option<&str>) -> Upstream {
    Upstream {
        base_url: format!("{base}/v1"),
        api_key: Some("sk-channel".into()),
        model: model.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;
    use crate::proxy::ingress::test_job as job;
    use crate::proxy::streaming::{drain, pump, SseFilter, StreamEnd};
    use crate::state::test_relay;
    use tokio::sync::mpsc;

    fn upstream(base: &str, model: Option<&str>) -> Upstream {
        test_upstream(base, model)
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
    async fn upstream_failures_map_to_client_errors_and_charges() {
        let mock = crate::mock::spawn_for_tests(4).await;
        let state = test_relay(false, None, Duration::from_millis(300));
        let body = json!({"model": "m", "messages": []});
        let refund = |reason: &'static str| Outcome::Refund(reason.into());
        for (fail, status, code, outcome) in [
            ("500", 502, "upstream_unavailable", refund("upstream_error")),
            ("503", 502, "upstream_unavailable", refund("upstream_error")),
            (
                "401",
                502,
                "upstream_auth_failed",
                refund("upstream_auth_failed"),
            ),
            (
                "403",
                502,
                "upstream_auth_failed",
                refund("upstream_auth_failed"),
            ),
            ("400", 400, "invalid_request", refund("upstream_rejected")),
            ("409", 409, "upstream_rejected", refund("upstream_rejected")),
            (
                "429",
                429,
                "upstream_rate_limited",
                refund("upstream_rate_limited"),
            ),
            // sent, and never answered: the upstream may bill it
            (
                "timeout",
                504,
                "upstream_timeout",
                Outcome::Settle(job(Endpoint::ChatCompletions, body.clone(), &[]).reservation()),
            ),
        ] {
            let j = job(
                Endpoint::ChatCompletions,
                body.clone(),
                &[("x-mock-fail", fail)],
            );
            let Err(failure) = call_upstream(&state, &j, &upstream(&mock, None), true).await else {
                panic!("{fail} must fail");
            };
            let rendered = failure.error.into_response();
            let status_seen = rendered.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(rendered.into_body())
                .await
                .unwrap()
                .to_bytes();
            let shown: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                (
                    status_seen,
                    shown["error"]["code"].as_str(),
                    failure.outcome
                ),
                (status, Some(code), outcome),
                "{fail}: {shown}"
            );
            assert!(!shown.to_string().contains("org-"), "{shown}");
        }
        // nothing was sent: refunded
        let unreachable = Upstream {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: None,
            model: None,
        };
        let j = job(Endpoint::ChatCompletions, body, &[]);
        let Err(failure) = call_upstream(&state, &j, &unreachable, true).await else {
            panic!()
        };
        assert_eq!(failure.error.status_code(), 502);
        assert_eq!(
            failure.outcome,
            Outcome::Refund("upstream_unreachable".into())
        );
    }

    #[test]
    fn upstream_errors_are_shown_in_the_clients_terms() {
        let error = json!({
            "message": "The model `gpt-4o-2024-11-20` does not exist in organization org-AbC123 (project proj_x9, key sk-proj-****abcd).",
            "param": "model",
            "code": "model_not_found",
            "type": "invalid_request_error",
        });
        let shown = in_clients_terms(error, Some("gpt-4o-2024-11-20"), "gpt-4o");
        assert_eq!(
            shown["message"],
            "The model `gpt-4o` does not exist in organization [redacted] (project [redacted], key [redacted])."
        );
        assert_eq!(shown["code"], "model_not_found");
        assert_eq!(
            without_account_ids("task-org-1 and org-2"),
            "task-org-1 and [redacted]"
        );
    }
}
