//! OpenAI wire format of the mock: response bodies, stream chunks and usage objects.

use serde_json::{json, Value};

use crate::openai::Endpoint;

/// Words the mock "generates", one per completion token.
const WORDS: &[&str] = &[
    "Lorem",
    " ipsum",
    " dolor",
    " sit",
    " amet",
    ",",
    " consectetur",
    " adipiscing",
    " elit",
    ".",
];

pub fn token_text(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

pub fn output_text(n: u64) -> String {
    (0..n).map(token_text).collect()
}

/// Counts of one request, as the mock reports them in `usage`.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    /// the output stopped at the request's limit
    pub truncated: bool,
}

impl Counts {
    /// `finish_reason` of chat and text completions.
    pub fn finish_reason(&self) -> &'static str {
        if self.truncated {
            "length"
        } else {
            "stop"
        }
    }

    /// `status` of a finished Responses API response.
    pub fn response_status(&self) -> &'static str {
        if self.truncated {
            "incomplete"
        } else {
            "completed"
        }
    }
}

/// Deterministic prompt size: whitespace-separated words of every input text, plus 3 per chat
/// message / responses input item and 3 for a chat reply (so an empty chat costs 3).
pub fn prompt_tokens(endpoint: Endpoint, body: &Value) -> u64 {
    fn words(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Number(_) => 1,
            Value::Object(o) => o
                .get("text")
                .or_else(|| o.get("content"))
                .map(words)
                .unwrap_or(0),
            _ => 0,
        }
    }
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = body.get("messages").and_then(Value::as_array);
            let n = messages.map(|m| m.len() as u64).unwrap_or(0);
            let w: u64 = messages
                .into_iter()
                .flatten()
                .map(|m| m.get("content").map(words).unwrap_or(0))
                .sum();
            w + 3 * n + 3
        }
        Endpoint::Completions => body.get("prompt").map(words).unwrap_or(0),
        Endpoint::Embeddings => body.get("input").map(words).unwrap_or(0),
        Endpoint::Responses => {
            let instructions = body.get("instructions").map(words).unwrap_or(0);
            let input = match body.get("input") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| 3 + i.get("content").map(words).unwrap_or_else(|| words(i)))
                    .sum(),
                Some(other) => words(other),
                None => 0,
            };
            instructions + input
        }
    }
}

pub fn chat_usage(c: Counts) -> Value {
    json!({
        "prompt_tokens": c.prompt,
        "completion_tokens": c.completion,
        "total_tokens": c.prompt + c.completion,
        "prompt_tokens_details": {"cached_tokens": c.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
        }
    })
}

pub fn responses_usage(c: Counts) -> Value {
    json!({
        "input_tokens": c.prompt,
        "input_tokens_details": {"cached_tokens": c.cached},
        "output_tokens": c.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": c.prompt + c.completion,
    })
}

pub fn chat_completion(id: &str, created: u64, model: &str, c: Counts) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": output_text(c.completion), "refusal": null},
            "logprobs": null,
            "finish_reason": c.finish_reason()
        }],
        "usage": chat_usage(c),
    })
}

pub fn text_completion(id: &str, created: u64, model: &str, c: Counts) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": null,
        "choices": [{"text": output_text(c.completion), "index": 0, "logprobs": null, "finish_reason": c.finish_reason()}],
        "usage": chat_usage(c),
    })
}

pub fn embeddings(model: &str, body: &Value, c: Counts) -> Value {
    let inputs = match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let v: Vec<f64> = (0..8).map(|j| ((i * 8 + j) as f64 * 0.125).sin()).collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": c.prompt, "total_tokens": c.prompt},
    })
}

fn response_message(id: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": format!("msg_{id}"),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

pub fn response_object(
    id: &str,
    created: u64,
    model: &str,
    status: &str,
    c: Option<Counts>,
) -> Value {
    let (output, usage) = match c {
        Some(c) => (
            vec![response_message(id, &output_text(c.completion))],
            responses_usage(c),
        ),
        None => (vec![], Value::Null),
    };
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": usage,
    })
}

pub fn models() -> Value {
    json!({
        "object": "list",
        "data": [
            {"id": "mock-gpt-4o", "object": "model", "created": 0, "owned_by": "mock"},
            {"id": "mock-embedding", "object": "model", "created": 0, "owned_by": "mock"},
        ]
    })
}

pub fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

pub fn sse_event(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The SSE events of a streamed response, in order (without delays).
pub fn stream_events(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    c: Counts,
    include_usage: bool,
) -> Vec<String> {
    let mut events = Vec::new();
    // OpenAI sends `"usage": null` on every chunk when include_usage is set
    let with_usage = |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    match endpoint {
        Endpoint::ChatCompletions => {
            let chunk = |delta: Value, finish: Value| {
                with_usage(json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": null,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                }))
            };
            events.push(sse(&chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            )));
            for i in 0..c.completion {
                events.push(sse(&chunk(json!({"content": token_text(i)}), Value::Null)));
            }
            events.push(sse(&chunk(json!({}), json!(c.finish_reason()))));
            if include_usage {
                events.push(sse(&json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": null, "choices": [], "usage": chat_usage(c),
                })));
            }
            events.push("data: [DONE]\n\n".into());
        }
        Endpoint::Completions => {
            let chunk = |text: &str, finish: Value| {
                with_usage(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
                }))
            };
            for i in 0..c.completion {
                events.push(sse(&chunk(token_text(i), Value::Null)));
            }
            events.push(sse(&chunk("", json!(c.finish_reason()))));
            if include_usage {
                events.push(sse(&json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": chat_usage(c),
                })));
            }
            events.push("data: [DONE]\n\n".into());
        }
        Endpoint::Responses => {
            // the Responses API always reports usage in response.completed and sends no [DONE]
            let mut seq = 0u64;
            let mut next = || {
                seq += 1;
                seq
            };
            events.push(sse_event(
                "response.created",
                &json!({
                    "type": "response.created", "sequence_number": next(),
                    "response": response_object(id, created, model, "in_progress", None),
                }),
            ));
            let item_id = format!("msg_{id}");
            for i in 0..c.completion {
                events.push(sse_event("response.output_text.delta", &json!({
                    "type": "response.output_text.delta", "sequence_number": next(),
                    "item_id": item_id, "output_index": 0, "content_index": 0, "delta": token_text(i),
                })));
            }
            events.push(sse_event("response.output_text.done", &json!({
                "type": "response.output_text.done", "sequence_number": next(),
                "item_id": item_id, "output_index": 0, "content_index": 0, "text": output_text(c.completion),
            })));
            let status = c.response_status();
            let kind = format!("response.{status}");
            events.push(sse_event(
                &kind,
                &json!({
                    "type": kind, "sequence_number": next(),
                    "response": response_object(id, created, model, status, Some(c)),
                }),
            ));
        }
        Endpoint::Embeddings => {}
    }
    events
}
