//! One error type for every client-visible failure, rendered in OpenAI's error JSON shape.
//! Messages are written for the client; internal causes are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Missing, garbled or unknown API key.
    #[error("{0}")]
    InvalidApiKey(String),
    /// quota.admit said no: status, code and message come from the engine.
    #[error("{message}")]
    Denied {
        status: StatusCode,
        code: String,
        message: String,
        retry_after_s: Option<i64>,
    },
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        param: Option<&'static str>,
    },
    /// Bad input refused by the engine (SQLSTATE class PQ); the engine's message is meant for
    /// the caller.
    #[error("{message}")]
    RejectedByEngine { sqlstate: String, message: String },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The upstream answered a request error (4xx other than auth); its OpenAI error object is
    /// passed on as is.
    #[error("upstream rejected the request")]
    UpstreamRejected {
        status: StatusCode,
        error: serde_json::Value,
        retry_after: Option<HeaderValue>,
    },
    #[error("{0}")]
    UpstreamUnavailable(&'static str),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the quota database is unavailable")]
    DatabaseUnavailable,
    #[error("internal error")]
    Internal,
}

impl AppError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            AppError::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            AppError::Denied { status, .. } => *status,
            AppError::BadRequest { .. } | AppError::RejectedByEngine { .. } => {
                StatusCode::BAD_REQUEST
            }
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::UpstreamRejected { status, .. } => *status,
            AppError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            AppError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            AppError::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `code` field of the error object.
    pub fn code(&self) -> Option<String> {
        let code = match self {
            AppError::InvalidApiKey(_) => "invalid_api_key",
            AppError::Denied { code, .. } => return Some(code.clone()),
            AppError::BadRequest { code, .. } => code,
            AppError::RejectedByEngine { .. } => "invalid_request",
            AppError::PayloadTooLarge { .. } => "request_too_large",
            AppError::NotFound => "unknown_url",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::UpstreamRejected { .. } => return None,
            AppError::UpstreamUnavailable(_) => "upstream_unavailable",
            AppError::UpstreamTimeout => "upstream_timeout",
            AppError::DatabaseUnavailable => "quota_database_unavailable",
            AppError::Internal => "internal_error",
        };
        Some(code.to_string())
    }

    /// Short label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            AppError::InvalidApiKey(_) => "unauthorized",
            AppError::Denied { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                "quota_exceeded"
            }
            AppError::Denied { .. } => "denied",
            AppError::BadRequest { .. }
            | AppError::RejectedByEngine { .. }
            | AppError::PayloadTooLarge { .. }
            | AppError::NotFound
            | AppError::MethodNotAllowed => "bad_request",
            AppError::UpstreamRejected { .. }
            | AppError::UpstreamUnavailable(_)
            | AppError::UpstreamTimeout => "upstream_error",
            AppError::DatabaseUnavailable => "database_unavailable",
            AppError::Internal => "internal_error",
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
            param: None,
        }
    }
}

/// The `type` field, by HTTP status, following the names the official OpenAI SDKs and API use
/// (the SDKs pick their exception class from the status: 401 AuthenticationError, 403
/// PermissionDeniedError, 429 RateLimitError, 5xx InternalServerError).
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        403 => "permission_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// `{"error":{"message","type","param","code"}}`
pub fn error_body(
    status: StatusCode,
    message: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> serde_json::Value {
    json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code,
        }
    })
}

/// "error connecting to server: Connection refused (os error 111)": the message and its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let mut response = match &self {
            AppError::UpstreamRejected { error, .. } => {
                (status, axum::Json(json!({ "error": error }))).into_response()
            }
            _ => {
                let param = match &self {
                    AppError::BadRequest { param, .. } => *param,
                    _ => None,
                };
                let code = self.code();
                let body = error_body(status, &self.to_string(), code.as_deref(), param);
                (status, axum::Json(body)).into_response()
            }
        };
        if matches!(self, AppError::Denied { .. }) {
            // A quota decision: retrying at once cannot change it. The official SDKs honour this
            // header instead of retrying a 429 on their own.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        match self {
            AppError::Denied {
                retry_after_s: Some(s),
                ..
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(s.max(0)));
            }
            AppError::UpstreamRejected {
                retry_after: Some(v),
                ..
            } => {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(e: AppError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let r = e.into_response();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn quota_denial_is_429_rate_limit_error_with_retry_after() {
        let (status, headers, body) = render(AppError::Denied {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "token_quota_policy_exhausted".into(),
            message: "Daily quota used up; it resets in about 3 hours.".into(),
            retry_after_s: Some(10800),
        })
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[header::RETRY_AFTER], "10800");
        assert_eq!(
            headers["x-should-retry"], "false",
            "SDKs must not retry a quota decision"
        );
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "token_quota_policy_exhausted");
        assert_eq!(
            body["error"]["message"],
            "Daily quota used up; it resets in about 3 hours."
        );
        assert!(body["error"].as_object().unwrap().contains_key("param"));
    }

    #[tokio::test]
    async fn invalid_key_and_forbidden_key_shapes() {
        let (status, _, body) = render(AppError::InvalidApiKey("Invalid API key.".into())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");

        let (status, headers, body) = render(AppError::Denied {
            status: StatusCode::FORBIDDEN,
            code: "api_key_expired".into(),
            message: "This API key has expired.".into(),
            retry_after_s: None,
        })
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert_eq!(body["error"]["type"], "permission_error");
        assert_eq!(body["error"]["code"], "api_key_expired");
    }

    #[tokio::test]
    async fn server_side_errors_do_not_leak_internals() {
        for (e, status, code) in [
            (
                AppError::DatabaseUnavailable,
                503,
                "quota_database_unavailable",
            ),
            (AppError::Internal, 500, "internal_error"),
            (AppError::UpstreamTimeout, 504, "upstream_timeout"),
            (
                AppError::UpstreamUnavailable("the upstream could not be reached"),
                502,
                "upstream_unavailable",
            ),
        ] {
            let (s, _, body) = render(e).await;
            assert_eq!(s.as_u16(), status);
            assert_eq!(body["error"]["type"], "server_error");
            assert_eq!(body["error"]["code"], code);
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(
                !msg.contains("postgres") && !msg.contains("SQLSTATE"),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn upstream_request_errors_are_passed_on() {
        let (status, _, body) = render(AppError::UpstreamRejected {
            status: StatusCode::BAD_REQUEST,
            error: json!({"message": "context too long", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}),
            retry_after: None,
        })
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "context_length_exceeded");
    }
}
