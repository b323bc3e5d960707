//! One error type for every client-visible failure, rendered in OpenAI's error JSON shape.
//! Messages are written for the client; internal causes are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::openai::error_body;

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
    /// The upstream refused the relay's own credentials: nothing the client can fix.
    #[error("The upstream refused the relay's credentials.")]
    UpstreamAuthFailed,
    /// The upstream rate-limits the relay's account; its body (which names the account and its
    /// limits) is not passed on, its `Retry-After` is.
    #[error("The upstream is rate limiting requests; retry later.")]
    UpstreamRateLimited { retry_after: Option<HeaderValue> },
    #[error("{0}")]
    UpstreamUnavailable(&'static str),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the quota database is unavailable")]
    DatabaseUnavailable,
    /// The database is there but did not serve the call in time (pool exhausted, lock or
    /// statement timeout): not an outage, so never a reason to fail open.
    #[error("the quota database is busy; retry shortly")]
    DatabaseBusy,
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
            AppError::UpstreamAuthFailed => StatusCode::BAD_GATEWAY,
            AppError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            AppError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            AppError::DatabaseUnavailable | AppError::DatabaseBusy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            AppError::UpstreamAuthFailed => "upstream_auth_failed",
            AppError::UpstreamRateLimited { .. } => "upstream_rate_limited",
            AppError::UpstreamUnavailable(_) => "upstream_unavailable",
            AppError::UpstreamTimeout => "upstream_timeout",
            AppError::DatabaseUnavailable => "quota_database_unavailable",
            AppError::DatabaseBusy => "database_busy",
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
            | AppError::UpstreamAuthFailed
            | AppError::UpstreamRateLimited { .. }
            | AppError::UpstreamUnavailable(_)
            | AppError::UpstreamTimeout => "upstream_error",
            AppError::DatabaseUnavailable => "database_unavailable",
            AppError::DatabaseBusy => "database_busy",
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

/// A failed database call, as the relay tells its kinds apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database cannot be connected to (or dropped the connection): an outage.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database is there but did not serve the call in time: the pool's wait, the call's
    /// time limit, a lock or statement timeout (55P03, 57014), too many connections (53300).
    #[error("database busy: {0}")]
    Busy(String),
    #[error("SQLSTATE {code}: {message}")]
    Sql { code: String, message: String },
    /// The key may not be used (SQLSTATE PQ403): the engine's message, and its error code
    /// (key_disabled, user_disabled, key_expired) from DETAIL.
    #[error("forbidden ({code}): {message}")]
    Forbidden { code: String, message: String },
}

impl DbError {
    /// A transaction PostgreSQL rolled back to resolve a conflict (deadlock, serialization).
    pub fn is_conflict(&self) -> bool {
        matches!(self, DbError::Sql { code, .. } if code.starts_with("40"))
    }

    /// Worth trying again: connection trouble, a busy database or a transaction conflict.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Unavailable(_) | DbError::Busy(_) => true,
            DbError::Sql { code, .. } => code.starts_with("40") || code.starts_with("08"),
            DbError::Forbidden { .. } => false,
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code().to_string();
                // lock and statement timeouts, too many connections: there, but loaded
                if ["55P03", "57014", "53300"].contains(&code.as_str()) {
                    DbError::Busy(format!("{code}: {}", db.message()))
                // connection exceptions, shutdown, out of resources, a server that takes no
                // writes (25006: a demoted primary): the quota database is away
                } else if code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || code == "25006"
                {
                    DbError::Unavailable(format!("{code}: {}", db.message()))
                } else if code == "PQ403" {
                    DbError::Forbidden {
                        code: db.detail().unwrap_or("permission_denied").to_string(),
                        message: db.message().to_string(),
                    }
                } else {
                    DbError::Sql {
                        code,
                        message: db.message().to_string(),
                    }
                }
            }
            None => DbError::Unavailable(error_chain(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            // every connection in use for the whole wait: load, not an outage
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                DbError::Busy("no pooled connection came free in time".into())
            }
            other => DbError::Unavailable(error_chain(&other)),
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(_) => AppError::DatabaseUnavailable,
            DbError::Busy(_) => AppError::DatabaseBusy,
            DbError::Forbidden { code, message } => AppError::Denied {
                status: axum::http::StatusCode::FORBIDDEN,
                code,
                message,
                retry_after_s: None,
            },
            DbError::Sql { code, message } if code.starts_with("PQ") => {
                AppError::RejectedByEngine {
                    sqlstate: code,
                    message,
                }
            }
            DbError::Sql { code, .. } if code == "28000" => {
                AppError::InvalidApiKey("Incorrect API key provided.".into())
            }
            DbError::Sql { code, message } => {
                tracing::error!(sqlstate = %code, %message, "unexpected SQL error");
                AppError::Internal
            }
        }
    }
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
            }
            | AppError::UpstreamRateLimited {
                retry_after: Some(v),
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

    #[test]
    fn sql_errors_map_to_client_statuses() {
        let pq: AppError = DbError::Sql {
            code: "PQ001".into(),
            message: "est_input_tokens must be >= 0".into(),
        }
        .into();
        assert_eq!(pq.status_code(), 400);
        assert_eq!(pq.to_string(), "est_input_tokens must be >= 0");
        let auth: AppError = DbError::Sql {
            code: "28000".into(),
            message: "x".into(),
        }
        .into();
        assert_eq!(auth.status_code(), 401);
        let other: AppError = DbError::Sql {
            code: "42883".into(),
            message: "function quota.admit does not exist".into(),
        }
        .into();
        assert_eq!(other.status_code(), 500);
        assert!(!other.to_string().contains("quota.admit"));
        let forbidden: AppError = DbError::Forbidden {
            code: "key_expired".into(),
            message: "This API key has expired.".into(),
        }
        .into();
        assert_eq!(forbidden.status_code(), 403);
        assert_eq!(forbidden.code().as_deref(), Some("key_expired"));
        let down: AppError = DbError::Unavailable("connection refused".into()).into();
        assert_eq!(down.status_code(), 503);
    }

    #[tokio::test]
    async fn any_refusal_of_the_engine_keeps_its_status_and_code() {
        // codes the engine may add later need no change here
        for (status, code, kind) in [
            (400, "model_not_priced", "invalid_request_error"),
            (403, "channel_not_allowed", "permission_error"),
            (429, "some_future_quota_code", "rate_limit_error"),
            (503, "no_channel_available", "server_error"),
        ] {
            let (s, _, body) = render(AppError::Denied {
                status: StatusCode::from_u16(status).unwrap(),
                code: code.into(),
                message: "m".into(),
                retry_after_s: None,
            })
            .await;
            assert_eq!(s.as_u16(), status);
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["type"], kind);
        }
        let (s, _, body) = render(
            DbError::Sql {
                code: "PQ400".into(),
                message: "model names are at most 200 characters".into(),
            }
            .into(),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            body["error"]["message"],
            "model names are at most 200 characters"
        );
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
