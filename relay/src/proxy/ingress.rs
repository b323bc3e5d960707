//! Ingress: what the relay checks and computes before it asks the database anything: the
//! key, the body (size, JSON, model), the client headers passed upstream, and the token
//! estimates of the reservation.

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use crate::error::AppError;
use crate::estimate;
use crate::openai::Endpoint;
use crate::state::AppState;

/// Bodies above this size are estimated on the blocking pool (BPE on megabytes takes a while).
const BLOCKING_ESTIMATE_BYTES: usize = 256 * 1024;
pub const CHANNEL_HEADER: &str = "x-pgq-channel-id";

/// Everything the lifecycle task needs. Not `Debug`: it carries the client's key.
pub struct Job {
    pub request_id: String,
    pub endpoint: Endpoint,
    pub api_key: String,
    pub channel_id: Option<i64>,
    pub model: String,
    pub body: Map<String, Value>,
    pub stream: bool,
    pub client_wants_usage: bool,
    pub est_input: i64,
    pub max_output: i64,
    /// client headers passed on to the upstream (see `forwarded_headers`)
    pub headers: HeaderMap,
}

/// Checks the request (key shape, size, JSON, model) and estimates its tokens: everything the
/// relay knows before it asks the database.
pub async fn read_request(
    state: &AppState,
    endpoint: Endpoint,
    request_id: String,
    req: Request,
) -> Result<Job, AppError> {
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

    Ok(Job {
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

/// A job as ingress would make it, for the tests of the rooms after it.
#[cfg(test)]
pub fn test_job(
    endpoint: Endpoint,
    body: Value,
    client_headers: &[(&'static str, &'static str)],
) -> Job {
    use axum::http::{HeaderName, HeaderValue};
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

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
}
