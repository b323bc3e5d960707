//! Streaming: SSE passed through event by event, with usage captured on the way.
//!
//! The upstream's byte stream is cut into whole SSE events, each forwarded unchanged, except
//! the final usage-only chunk (`choices: []` + `usage`) when the relay asked for it on the
//! client's behalf. Usage is captured from that chunk (Chat/Completions) or from
//! `response.completed` (Responses API); the generated text is kept so that output tokens can
//! be counted if the stream ends without usage.

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::error_chain;
use crate::openai::{usage_from_json, Usage};

/// SSE events buffered between the upstream reader and a slow client.
pub const STREAM_BUFFER_EVENTS: usize = 32;

pub fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
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
    /// The client went away; the upstream was read on to its end (or its failure).
    ClientGone,
}

/// Moves whole SSE events from the upstream to the client until the upstream stops. If the
/// client leaves first, the rest of the stream is still read (not sent), for its usage: the
/// upstream goes on generating, and billing, after a client hangs up.
pub async fn pump(
    upstream: reqwest::Response,
    tx: mpsc::Sender<Bytes>,
    filter: &mut SseFilter,
) -> StreamEnd {
    let mut chunks = upstream.bytes_stream();
    let mut client_gone = false;
    loop {
        let next = if client_gone {
            chunks.next().await
        } else {
            tokio::select! {
                biased;
                _ = tx.closed() => {
                    tracing::info!("client left mid-stream; reading the upstream to its end for usage");
                    client_gone = true;
                    continue;
                }
                next = chunks.next() => next,
            }
        };
        match next {
            Some(Ok(bytes)) => {
                for event in filter.push(&bytes) {
                    if !client_gone && tx.send(event).await.is_err() {
                        tracing::info!(
                            "client left mid-stream; reading the upstream to its end for usage"
                        );
                        client_gone = true;
                    }
                }
            }
            Some(Err(e)) if client_gone => {
                tracing::warn!(error = %error_chain(&e.without_url()), "upstream stream failed after the client left");
                return StreamEnd::ClientGone;
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
                    if !client_gone {
                        let _ = tx.send(rest).await;
                    }
                }
                return if client_gone {
                    StreamEnd::ClientGone
                } else {
                    StreamEnd::Completed
                };
            }
        }
    }
}

/// Cuts a byte stream into SSE events, forwards them, captures usage and text.
#[derive(Debug, Default)]
pub struct SseFilter {
    hide_usage_chunk: bool,
    buf: BytesMut,
    pub usage: Option<Usage>,
    /// Text generated so far (content deltas), for counting when no usage arrives.
    pub text: String,
    /// Events that carried generated content.
    pub content_events: u64,
    pub saw_done: bool,
}

impl SseFilter {
    /// `hide_usage_chunk`: the client did not ask for usage, the relay did; do not show it.
    pub fn new(hide_usage_chunk: bool) -> Self {
        Self {
            hide_usage_chunk,
            ..Self::default()
        }
    }

    /// Feed upstream bytes; returns the whole events to send to the client, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let event = self.buf.split_to(end).freeze();
            if self.inspect(&event) {
                out.push(event);
            }
        }
        out
    }

    /// End of the upstream stream: whatever is left (an event without its blank line).
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            self.buf.clear();
            return None;
        }
        let event = self.buf.split().freeze();
        self.inspect(&event).then_some(event)
    }

    /// Records what the event says; returns whether to forward it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data.trim() == "[DONE]" {
            self.saw_done = true;
            return true;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            return true;
        };
        if let Some(u) = usage_from_json(&v) {
            self.usage = Some(u);
        }
        let before = self.text.len();
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for c in choices {
                for ptr in [
                    "/delta/content",
                    "/delta/refusal",
                    "/delta/reasoning_content",
                    "/text",
                ] {
                    if let Some(s) = c.pointer(ptr).and_then(Value::as_str) {
                        self.text.push_str(s);
                    }
                }
                if let Some(calls) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
                    for call in calls {
                        if let Some(s) = call.pointer("/function/arguments").and_then(Value::as_str)
                        {
                            self.text.push_str(s);
                        }
                    }
                }
            }
        }
        // Responses API: response.output_text.delta, response.function_call_arguments.delta, ...
        if v.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with("response.") && t.ends_with(".delta"))
        {
            if let Some(s) = v.get("delta").and_then(Value::as_str) {
                self.text.push_str(s);
            }
        }
        if self.text.len() > before {
            self.content_events += 1;
        }
        let usage_only = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(Value::is_object);
        !(self.hide_usage_chunk && usage_only)
    }
}

/// Index just past the blank line that ends the first event, if a whole event is buffered.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The `data:` lines of one event, joined by newlines.
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

/// Everything a client receives from `rx`, as text (for tests).
#[cfg(test)]
pub async fn drain(mut rx: mpsc::Receiver<Bytes>) -> String {
    let mut out = Vec::new();
    while let Some(b) = rx.recv().await {
        out.extend_from_slice(&b);
    }
    String::from_utf8(out).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunk(content: &str) -> String {
        format!(
            "data: {}\n\n",
            json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        )
    }

    fn usage_chunk() -> String {
        format!(
            "data: {}\n\n",
            json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}}})
        )
    }

    fn stream_text() -> String {
        [
            chunk("a"),
            chunk("b"),
            chunk("c"),
            usage_chunk(),
            "data: [DONE]\n\n".into(),
        ]
        .concat()
    }

    #[test]
    fn usage_chunk_is_hidden_when_the_relay_asked_for_it() {
        let mut f = SseFilter::new(true);
        let out = f.push(stream_text().as_bytes());
        let shown: String = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(out.len(), 4, "3 content chunks + [DONE]");
        assert!(!shown.contains("\"usage\""));
        assert!(shown.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            f.usage,
            Some(Usage {
                input_tokens: 12,
                output_tokens: 3,
                cached_tokens: 4
            })
        );
        assert_eq!(f.text, "abc");
        assert!(f.saw_done);
    }

    #[test]
    fn usage_chunk_is_shown_when_the_client_asked_for_it() {
        let mut f = SseFilter::new(false);
        let out: Vec<u8> = f.push(stream_text().as_bytes()).concat();
        assert_eq!(out, stream_text().as_bytes(), "bytes pass unchanged");
        assert_eq!(f.usage.unwrap().input_tokens, 12);
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let text = stream_text();
        let mut f = SseFilter::new(false);
        let mut out = Vec::new();
        for piece in text.as_bytes().chunks(7) {
            for ev in f.push(piece) {
                assert!(ev.ends_with(b"\n\n"), "only whole events are forwarded");
                out.extend_from_slice(&ev);
            }
        }
        assert!(f.finish().is_none());
        assert_eq!(out, text.as_bytes());
        assert_eq!(f.text, "abc");
        assert_eq!(f.content_events, 3);
    }

    #[test]
    fn crlf_events_and_trailing_partial_event() {
        let mut f = SseFilter::new(false);
        let out = f.push(b"data: {\"choices\":[{\"text\":\"hi\"}]}\r\n\r\ndata: [DONE]");
        assert_eq!(out.len(), 1);
        assert_eq!(f.text, "hi");
        assert_eq!(f.finish().as_deref(), Some(&b"data: [DONE]"[..]));
        assert!(f.saw_done);
    }

    #[test]
    fn responses_api_events_give_text_and_usage() {
        let events = [
            format!("event: response.output_text.delta\ndata: {}\n\n", json!({"type": "response.output_text.delta", "delta": "Hel"})),
            format!("event: response.output_text.delta\ndata: {}\n\n", json!({"type": "response.output_text.delta", "delta": "lo"})),
            format!("event: response.completed\ndata: {}\n\n", json!({"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}})),
        ]
        .concat();
        let mut f = SseFilter::new(true);
        let out = f.push(events.as_bytes());
        assert_eq!(
            out.len(),
            3,
            "response.completed is not a usage-only chat chunk"
        );
        assert_eq!(f.text, "Hello");
        assert_eq!(
            f.usage,
            Some(Usage {
                input_tokens: 9,
                output_tokens: 2,
                cached_tokens: 1
            })
        );
    }
}
