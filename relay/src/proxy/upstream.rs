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

/// Sends the request upstream. On failure returns the client's error and the refund reason.
/// `accounting`: the relay will settle, so it asks a streaming upstream for usage.
pub async fn call_upstream(
    state: &AppState,
    job: &Job,
    upstream: &Upstream,
    accounting: bool,
) -> Result<UpstreamReply, (AppError, &'static str)> {
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
                    "type": crate::openai::error_type(status),
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
}
