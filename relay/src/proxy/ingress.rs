//! Ingress: what the relay checks and computes before it asks the database anything: the
//! key, the body (size, JSON, model), the client headers passed upstream, and the token
//! estimates of the reservation.

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use crate::config::HeaderPattern;
use crate::error::AppError;
use crate::estimate::{self, OutputLimit};
use crate::openai::{Endpoint, Usage};
use crate::state::AppState;

/// Bodies above this size are parsed and estimated on the blocking pool, one per core at a
/// time, so that large bodies never hold up the async workers (or `/healthz`). Below it an
/// estimate costs at most about 2 ms (0.5 µs a byte at worst, release build).
const BLOCKING_ESTIMATE_BYTES: usize = 4 * 1024;
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
    /// output tokens reserved: the client's limit, or the default (see `output_cap`)
    pub max_output: i64,
    /// per choice: the default limit the upstream must be told, when the client named none
    pub output_cap: Option<i64>,
    /// client headers passed on to the upstream (see `forwarded_headers`)
    pub headers: HeaderMap,
}

impl Job {
    /// The whole reservation as usage: what an unknown outcome is charged.
    pub fn reservation(&self) -> Usage {
        Usage {
            input_tokens: self.est_input,
            output_tokens: self.max_output,
            cached_tokens: 0,
        }
    }
}

/// What the body says, parsed and estimated.
struct Parsed {
    model: String,
    body: Map<String, Value>,
    stream: bool,
    client_wants_usage: bool,
    est_input: i64,
    output: OutputLimit,
}

/// Checks the request (key, size, JSON, model) and estimates its tokens: everything the relay
/// knows before it asks the database. The key's shape is checked first, so a request without
/// a key costs neither a body read nor a tokenizer run.
pub async fn read_request(
    state: &AppState,
    endpoint: Endpoint,
    request_id: String,
    req: Request,
) -> Result<Job, AppError> {
    let api_key = bearer_token(req.headers())?;
    let channel_id = channel_header(req.headers())?;
    let headers = forwarded_headers(req.headers(), &state.config.forward_headers);
    let bytes = read_body(req, state.config.max_body_bytes).await?;
    let default_output = state.config.default_max_output_tokens;
    let parsed = if bytes.len() > BLOCKING_ESTIMATE_BYTES {
        let _permit = state
            .estimators
            .acquire()
            .await
            .map_err(|_| AppError::Internal)?;
        tokio::task::spawn_blocking(move || parse(endpoint, &bytes, default_output))
            .await
            .map_err(|_| AppError::Internal)??
    } else {
        parse(endpoint, &bytes, default_output)?
    };
    Ok(Job {
        request_id,
        endpoint,
        api_key,
        channel_id,
        model: parsed.model,
        body: parsed.body,
        stream: parsed.stream,
        client_wants_usage: parsed.client_wants_usage,
        est_input: parsed.est_input,
        max_output: parsed.output.reserved(),
        output_cap: (!parsed.output.from_client).then_some(parsed.output.per_choice),
        headers,
    })
}

/// The body as JSON, its model, and its estimates (time linear in its size; see `estimate`).
fn parse(endpoint: Endpoint, bytes: &[u8], default_output: i64) -> Result<Parsed, AppError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
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
    let body = Value::Object(body);
    let output = estimate::output_limit(endpoint, &body, default_output)?;
    let est_input = estimate::estimate_input_tokens(endpoint, &model, &body);
    let Value::Object(body) = body else {
        unreachable!("an object above")
    };
    Ok(Parsed {
        model,
        body,
        stream,
        client_wants_usage,
        est_input,
        output,
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
    if !is_key_shaped(token) {
        return Err(AppError::InvalidApiKey(
            "Incorrect API key provided.".into(),
        ));
    }
    Ok(token.to_string())
}

/// Whether `token` has the shape of the engine's keys, `sk-pgq-<12 hex>-<64 hex>` (what
/// `quota.create_key` returns): anything else cannot be a key, and is refused at once.
pub fn is_key_shaped(token: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    token.len() == 84
        && token.is_ascii()
        && token.starts_with("sk-pgq-")
        && token.as_bytes()[19] == b'-'
        && hex(&token[7..19])
        && hex(&token[20..])
}

/// Client headers the upstream may see, on top of what the relay sets itself (content type,
/// accept, authorization, x-request-id): the SDKs' own (`user-agent`, `x-stainless-*`,
/// `openai-*` such as `openai-beta`), idempotency keys, and what the operator adds with
/// `--forward-header`. Everything else stays with the relay (`x-forwarded-*`,
/// `x-http-method-override`, cloud credentials, the mock's `x-mock-*` controls, ...).
/// `openai-organization` and `openai-project` pick an account of the relay's own key, so they
/// are not the client's to choose.
const ALLOWED_NAMES: &[&str] = &["user-agent", "idempotency-key", "x-idempotency-key"];
const ALLOWED_PREFIXES: &[&str] = &["x-stainless-", "openai-"];
const NOT_THE_CLIENTS: &[&str] = &["openai-organization", "openai-project"];

fn forwarded_headers(headers: &HeaderMap, extra: &[HeaderPattern]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let allowed = ALLOWED_NAMES.contains(&n)
            || (ALLOWED_PREFIXES.iter().any(|p| n.starts_with(p)) && !NOT_THE_CLIENTS.contains(&n))
            || extra.iter().any(|p| p.matches(n));
        if allowed {
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
        api_key: TEST_KEY.into(),
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
        output_cap: None,
        headers,
    }
}

/// A key of the engine's shape, for tests that never reach a database.
#[cfg(test)]
pub const TEST_KEY: &str =
    "sk-pgq-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

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
        let bearer = format!("Bearer {TEST_KEY}");
        assert_eq!(bearer_token(&headers(&bearer)).unwrap(), TEST_KEY);
        let loose = format!("bearer  {TEST_KEY} ");
        assert_eq!(bearer_token(&headers(&loose)).unwrap(), TEST_KEY);
        for bad in [TEST_KEY, "Basic dXNlcjpwYXNz", "Bearer ", "Bearer a b"] {
            let e = bearer_token(&headers(bad)).unwrap_err();
            assert_eq!(e.status_code(), 401, "{bad}");
        }
        assert_eq!(
            bearer_token(&HeaderMap::new()).unwrap_err().status_code(),
            401
        );
    }

    #[test]
    fn only_strings_of_the_engines_key_shape_are_keys() {
        assert!(is_key_shaped(TEST_KEY));
        let upper = TEST_KEY.replace("abcdef", "ABCDEF");
        assert!(is_key_shaped(&upper), "hex either case");
        for bad in [
            "nonsense".to_string(),
            "sk-abc".to_string(),
            TEST_KEY[..83].to_string(),
            format!("{TEST_KEY}0"),
            TEST_KEY.replacen("sk-pgq-", "sk-xyz-", 1),
            TEST_KEY.replacen('-', "_", 3),
            TEST_KEY.replace('f', "g"),
            format!("sk-pgq-{}é{}", "0".repeat(11), "0".repeat(64)),
        ] {
            assert!(!is_key_shaped(&bad), "{bad}");
            let e = bearer_token(&headers(&format!("Bearer {bad}"))).unwrap_err();
            assert_eq!(e.code().as_deref(), Some("invalid_api_key"), "{bad}");
        }
    }

    #[test]
    fn only_allowed_client_headers_reach_the_upstream() {
        let mut h = headers("Bearer sk-client");
        for (k, v) in [
            ("x-mock-output-tokens", "3"),
            ("x-stainless-lang", "python"),
            ("user-agent", "OpenAI/Python"),
            ("openai-beta", "assistants=v2"),
            ("openai-organization", "org-abc"),
            ("idempotency-key", "k1"),
            ("x-api-key", "sk-client"),
            ("x-pgq-channel-id", "7"),
            ("cookie", "a=b"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-http-method-override", "DELETE"),
            ("x-amz-security-token", "t"),
            ("connection", "keep-alive"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let names = |out: HeaderMap| {
            let mut names: Vec<String> = out.keys().map(|n| n.as_str().to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(forwarded_headers(&h, &[])),
            [
                "idempotency-key",
                "openai-beta",
                "user-agent",
                "x-stainless-lang"
            ]
        );
        let extra = [HeaderPattern::parse("x-mock-*").unwrap()];
        assert_eq!(
            names(forwarded_headers(&h, &extra)),
            [
                "idempotency-key",
                "openai-beta",
                "user-agent",
                "x-mock-output-tokens",
                "x-stainless-lang"
            ]
        );
    }
}
