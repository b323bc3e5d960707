//! OpenAI's wire format as both the relay and the mock upstream speak it: the endpoints, the
//! `usage` object of every endpoint, generated text, and the error body.

use axum::http::StatusCode;
use serde_json::{json, Value};

/// Which endpoint a request is for; decides where its text and limits live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Endpoint {
    /// Path below the upstream's base URL (which ends in `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
        }
    }

    /// The request fields that limit the output, in the order they take precedence.
    pub fn output_limit_fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::ChatCompletions => &["max_completion_tokens", "max_tokens"],
            Endpoint::Completions => &["max_tokens"],
            Endpoint::Responses => &["max_output_tokens"],
            Endpoint::Embeddings => &[],
        }
    }

    /// The field in which to tell `model` its output limit: chat models of OpenAI's reasoning
    /// families (o1, o3, o4, gpt-5) refuse `max_tokens` and take `max_completion_tokens`;
    /// other chat models, here and at every OpenAI-compatible upstream, take `max_tokens`.
    pub fn output_limit_field(self, model: &str) -> Option<&'static str> {
        match self {
            Endpoint::ChatCompletions => {
                let m = model
                    .rsplit('/')
                    .next()
                    .unwrap_or(model)
                    .to_ascii_lowercase();
                let reasoning = ["o1", "o3", "o4", "gpt-5"].iter().any(|family| {
                    m.strip_prefix(family)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.']))
                });
                Some(if reasoning {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                })
            }
            Endpoint::Completions => Some("max_tokens"),
            Endpoint::Responses => Some("max_output_tokens"),
            Endpoint::Embeddings => None,
        }
    }

    /// Whether `stream_options.include_usage` exists on this endpoint (the Responses API always
    /// reports usage in `response.completed` and rejects unknown stream options).
    pub fn supports_include_usage(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }
}

/// Actual usage as reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
}

fn int(v: Option<&Value>) -> Option<i64> {
    v.and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
    })
}

/// Usage from a response body, a stream chunk, or a Responses API event (`response.usage`).
/// Chat/Completions/Embeddings use `prompt_tokens`/`completion_tokens`; the Responses API
/// uses `input_tokens`/`output_tokens`.
pub fn usage_from_json(v: &Value) -> Option<Usage> {
    let u = match v.get("usage") {
        Some(u @ Value::Object(_)) => u,
        _ => match v.get("response").and_then(|r| r.get("usage")) {
            Some(u @ Value::Object(_)) => u,
            _ => return None,
        },
    };
    let input = int(u.get("prompt_tokens")).or_else(|| int(u.get("input_tokens")))?;
    let output = int(u.get("completion_tokens"))
        .or_else(|| int(u.get("output_tokens")))
        .unwrap_or(0);
    let cached = int(u.pointer("/prompt_tokens_details/cached_tokens"))
        .or_else(|| int(u.pointer("/input_tokens_details/cached_tokens")))
        .unwrap_or(0);
    Some(Usage {
        input_tokens: input.max(0),
        output_tokens: output.max(0),
        cached_tokens: cached.max(0),
    })
}

/// Generated text of a non-streaming response (used only when it carries no usage).
pub fn output_text_of_body(v: &Value, out: &mut String) {
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for c in choices {
            if let Some(s) = c.pointer("/message/content").and_then(Value::as_str) {
                out.push_str(s);
            }
            if let Some(s) = c.get("text").and_then(Value::as_str) {
                out.push_str(s);
            }
        }
    }
    if let Some(items) = v.get("output").and_then(Value::as_array) {
        for item in items {
            for part in item
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(s) = part.get("text").and_then(Value::as_str) {
                    out.push_str(s);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_limits_are_written_where_each_model_reads_them() {
        let chat = Endpoint::ChatCompletions;
        for (model, field) in [
            ("gpt-4o", "max_tokens"),
            ("o3-mini", "max_completion_tokens"),
            ("o1", "max_completion_tokens"),
            ("openai/o4-mini", "max_completion_tokens"),
            ("gpt-5", "max_completion_tokens"),
            ("gpt-5.1-codex", "max_completion_tokens"),
            ("omni-moderation", "max_tokens"),
            ("llama-3-70b", "max_tokens"),
        ] {
            assert_eq!(chat.output_limit_field(model), Some(field), "{model}");
        }
        assert_eq!(
            Endpoint::Responses.output_limit_field("o3"),
            Some("max_output_tokens")
        );
        assert_eq!(Endpoint::Embeddings.output_limit_field("e"), None);
    }

    #[test]
    fn usage_from_bodies_of_every_endpoint() {
        let chat = json!({"usage": {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}});
        assert_eq!(
            usage_from_json(&chat),
            Some(Usage {
                input_tokens: 5,
                output_tokens: 7,
                cached_tokens: 2
            })
        );
        let emb = json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}});
        assert_eq!(
            usage_from_json(&emb),
            Some(Usage {
                input_tokens: 8,
                output_tokens: 0,
                cached_tokens: 0
            })
        );
        let resp = json!({"usage": {"input_tokens": 3, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 1}}});
        assert_eq!(
            usage_from_json(&resp),
            Some(Usage {
                input_tokens: 3,
                output_tokens: 4,
                cached_tokens: 1
            })
        );
        assert_eq!(usage_from_json(&json!({"usage": null})), None);
        assert_eq!(usage_from_json(&json!({"choices": []})), None);
    }

    #[test]
    fn output_text_of_non_streaming_bodies() {
        let mut s = String::new();
        output_text_of_body(
            &json!({"choices": [{"message": {"content": "hi "}}, {"text": "there"}]}),
            &mut s,
        );
        output_text_of_body(
            &json!({"output": [{"content": [{"type": "output_text", "text": "!"}]}]}),
            &mut s,
        );
        assert_eq!(s, "hi there!");
    }
}
