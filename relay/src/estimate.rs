//! Token estimates for the reservation made by admit, and token counts for streamed output
//! when the upstream sent no usage.
//!
//! OpenAI model families (gpt-*, o1/o3/o4, chatgpt-*, text-embedding-*) are counted with the
//! real BPE tables shipped inside `tiktoken-rs`. Every other model is approximated as
//! ceil(chars / 4), OpenAI's published rule of thumb for English text; the engine settles on
//! the upstream's usage anyway, so the estimate only sizes the reservation.

use serde_json::Value;

use crate::error::AppError;
use crate::openai::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    O200k,
    Cl100k,
    /// ceil(chars / 4)
    Approx,
}

impl Tokenizer {
    pub fn for_model(model: &str) -> Self {
        let m = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let o_series = |p: &str| {
            m.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        };
        if m.starts_with("gpt-4o")
            || m.starts_with("gpt-4.1")
            || m.starts_with("gpt-4.5")
            || m.starts_with("gpt-5")
            || m.starts_with("gpt-oss")
            || m.starts_with("chatgpt-")
            || o_series("o1")
            || o_series("o3")
            || o_series("o4-mini")
            || o_series("o4")
        {
            Tokenizer::O200k
        } else if m.starts_with("gpt-4")
            || m.starts_with("gpt-3.5")
            || m.starts_with("gpt-35")
            || m.starts_with("text-embedding-")
        {
            Tokenizer::Cl100k
        } else {
            Tokenizer::Approx
        }
    }

    /// Tokens of `text`, in time linear in its length whatever the text (see `segments`).
    pub fn count(self, text: &str) -> i64 {
        if text.is_empty() {
            return 0;
        }
        let bpe = match self {
            Tokenizer::O200k => tiktoken_rs::o200k_base_singleton(),
            Tokenizer::Cl100k => tiktoken_rs::cl100k_base_singleton(),
            Tokenizer::Approx => {
                return i64::try_from(text.chars().count().div_ceil(4)).unwrap_or(i64::MAX)
            }
        };
        let n: usize = segments(text).map(|s| bpe.encode_ordinary(s).len()).sum();
        i64::try_from(n).unwrap_or(i64::MAX)
    }

    /// Load the BPE tables now rather than on the first request.
    pub fn warm_up() {
        let _ = tiktoken_rs::o200k_base_singleton();
        let _ = tiktoken_rs::cl100k_base_singleton();
    }
}

/// Longest run of whitespace, or of anything else, that BPE sees in one piece. BPE's merge
/// loop is quadratic in the length of a piece, and a piece is at most one such run (plus a
/// character): one 250 KB word took 37 s. Real words are far shorter, so cutting longer runs
/// changes a count by about one token per cut, and bounds the work per byte.
const MAX_RUN_BYTES: usize = 64;
/// Text handed to the tokenizer in one call; cut only where whitespace begins or ends.
const SEGMENT_BYTES: usize = 16 * 1024;

/// `text` in consecutive slices, none holding a run longer than `MAX_RUN_BYTES`.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len();
        let (mut run_start, mut run_ws) = (0, None);
        for (i, c) in rest.char_indices() {
            let ws = c.is_whitespace();
            if run_ws != Some(ws) {
                if i >= SEGMENT_BYTES {
                    cut = i;
                    break;
                }
                (run_start, run_ws) = (i, Some(ws));
            } else if i - run_start >= MAX_RUN_BYTES {
                cut = i;
                break;
            }
        }
        let (segment, tail) = rest.split_at(cut);
        rest = tail;
        Some(segment)
    })
}

/// Chat framing per message (role, separators), as in OpenAI's cookbook count.
const TOKENS_PER_MESSAGE: i64 = 3;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const TOKENS_REPLY_PRIMING: i64 = 3;

/// Estimated input tokens of a request body.
pub fn estimate_input_tokens(endpoint: Endpoint, model: &str, body: &Value) -> i64 {
    let tok = Tokenizer::for_model(model);
    let mut text = String::new();
    let mut extra: i64 = 0;
    match endpoint {
        Endpoint::ChatCompletions => {
            if let Some(messages) = body.get("messages").and_then(Value::as_array) {
                for m in messages {
                    extra += TOKENS_PER_MESSAGE;
                    for field in ["role", "name"] {
                        if let Some(s) = m.get(field).and_then(Value::as_str) {
                            push(&mut text, s);
                        }
                    }
                    if let Some(c) = m.get("content") {
                        collect_text(c, &mut text, &mut extra);
                    }
                    if let Some(calls) = m.get("tool_calls") {
                        push(&mut text, &calls.to_string());
                    }
                }
                extra += TOKENS_REPLY_PRIMING;
            }
            for field in ["tools", "functions", "response_format"] {
                if let Some(v) = body.get(field) {
                    push(&mut text, &v.to_string());
                }
            }
        }
        Endpoint::Completions => {
            if let Some(p) = body.get("prompt") {
                collect_text(p, &mut text, &mut extra);
            }
            if let Some(s) = body.get("suffix").and_then(Value::as_str) {
                push(&mut text, s);
            }
        }
        Endpoint::Embeddings => {
            if let Some(i) = body.get("input") {
                collect_text(i, &mut text, &mut extra);
            }
        }
        Endpoint::Responses => {
            if let Some(s) = body.get("instructions").and_then(Value::as_str) {
                push(&mut text, s);
            }
            if let Some(i) = body.get("input") {
                match i {
                    Value::Array(items) => {
                        for item in items {
                            extra += TOKENS_PER_MESSAGE;
                            collect_text(
                                item.get("content").unwrap_or(item),
                                &mut text,
                                &mut extra,
                            );
                        }
                    }
                    other => collect_text(other, &mut text, &mut extra),
                }
            }
            if let Some(v) = body.get("tools") {
                push(&mut text, &v.to_string());
            }
        }
    }
    tok.count(&text).saturating_add(extra)
}

fn push(text: &mut String, s: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(s);
}

/// Text of a content value: a string, an array of strings, token arrays (counted as they are),
/// or content parts (`{"type":"text","text":...}`, `input_text`, ...). Images and audio are not
/// counted here: the upstream's usage corrects the reservation at settle.
fn collect_text(v: &Value, text: &mut String, extra: &mut i64) {
    match v {
        Value::String(s) => push(text, s),
        Value::Number(_) => *extra += 1,
        Value::Array(items) => {
            for item in items {
                collect_text(item, text, extra);
            }
        }
        Value::Object(o) => {
            if let Some(s) = o.get("text").and_then(Value::as_str) {
                push(text, s);
            } else if let Some(c) = o.get("content") {
                collect_text(c, text, extra);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// The output a request may produce: per choice, times `n` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    pub per_choice: i64,
    pub choices: i64,
    /// the client named the limit; otherwise it is the default and the upstream must be told
    pub from_client: bool,
}

impl OutputLimit {
    /// Output tokens to reserve.
    pub fn reserved(self) -> i64 {
        self.per_choice.saturating_mul(self.choices)
    }
}

/// The request's own output limit (`Endpoint::output_limit_fields`), or the configured default
/// when it names none; 0 for embeddings.
pub fn output_limit(
    endpoint: Endpoint,
    body: &Value,
    default: i64,
) -> Result<OutputLimit, AppError> {
    let mut limit = OutputLimit {
        per_choice: default,
        choices: 1,
        from_client: false,
    };
    if endpoint == Endpoint::Embeddings {
        limit.per_choice = 0;
        limit.from_client = true;
        return Ok(limit);
    }
    for &field in endpoint.output_limit_fields() {
        match body.get(field) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                limit.per_choice =
                    v.as_i64()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| AppError::BadRequest {
                            code: "invalid_value",
                            message: format!("'{field}' must be a non-negative integer."),
                            param: Some(field),
                        })?;
                limit.from_client = true;
                break;
            }
        }
    }
    limit.choices = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_i64()
            .filter(|n| (1..=128).contains(n))
            .ok_or(AppError::BadRequest {
                code: "invalid_value",
                message: "'n' must be an integer between 1 and 128.".into(),
                param: Some("n"),
            })?,
    };
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn model_families_pick_their_tokenizer() {
        assert_eq!(Tokenizer::for_model("gpt-4o-mini"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("gpt-5"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("o3-mini"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("o1"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("openai/gpt-4.1"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("gpt-4-turbo"), Tokenizer::Cl100k);
        assert_eq!(Tokenizer::for_model("gpt-3.5-turbo"), Tokenizer::Cl100k);
        assert_eq!(
            Tokenizer::for_model("text-embedding-3-small"),
            Tokenizer::Cl100k
        );
        assert_eq!(Tokenizer::for_model("claude-sonnet-4"), Tokenizer::Approx);
        assert_eq!(Tokenizer::for_model("omni-moderation"), Tokenizer::Approx);
        assert_eq!(Tokenizer::for_model("llama-3-70b"), Tokenizer::Approx);
    }

    #[test]
    fn bpe_counts_are_real_token_counts() {
        assert_eq!(Tokenizer::O200k.count("hello world"), 2);
        assert_eq!(Tokenizer::Cl100k.count("hello world"), 2);
        assert_eq!(Tokenizer::O200k.count(""), 0);
    }

    #[test]
    fn segments_cover_the_text_and_cut_long_runs() {
        let text = format!(
            "{} {} {}",
            "a".repeat(200),
            " ".repeat(100),
            "é".repeat(100)
        );
        let parts: Vec<&str> = segments(&text).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.len() >= 8, "{}", parts.len());
        let words = "hello world ".repeat(10_000);
        let parts: Vec<&str> = segments(&words).collect();
        assert_eq!(parts.concat(), words);
        assert!(parts.iter().all(|p| p.len() <= SEGMENT_BYTES + 8));
        // natural text counts as it does uncut
        let whole = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&words)
            .len() as i64;
        let cut = Tokenizer::O200k.count(&words);
        assert!((cut - whole).abs() <= 4, "{cut} vs {whole}");
    }

    #[test]
    fn adversarial_text_costs_linear_time() {
        // one unbroken word: quadratic for plain BPE (a 250 KB word took 37 s)
        let word = "a".repeat(256 * 1024);
        let started = std::time::Instant::now();
        let n = Tokenizer::O200k.count(&word);
        let took = started.elapsed();
        assert!(n > 0);
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    /// The README's worst-case figure: `cargo test --release -p pg-quota-relay
    /// worst_case_estimate -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn worst_case_estimate_of_a_4_mib_body() {
        const SIZE: usize = 4 * 1024 * 1024;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut random = |alphabet: &[u8]| -> String {
            (0..SIZE)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    alphabet[(rng % alphabet.len() as u64) as usize] as char
                })
                .collect()
        };
        let shapes = [
            ("one word", "a".repeat(SIZE)),
            (
                "random letters",
                random(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            ),
            (
                "random bytes of text",
                random(b"abc XYZ 0123 !?.,;:-_()[]{}\t\n"),
            ),
            ("punctuation", "!?".repeat(SIZE / 2)),
            ("digits", "7".repeat(SIZE)),
            ("whitespace", " \t".repeat(SIZE / 2)),
            ("newlines", "\n ".repeat(SIZE / 2)),
            ("two-byte letters", "é".repeat(SIZE / 2)),
            ("short words", "ab ".repeat(SIZE / 3)),
        ];
        let mut worst = std::time::Duration::ZERO;
        for (name, text) in shapes {
            let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]});
            let started = std::time::Instant::now();
            let n = estimate_input_tokens(Endpoint::ChatCompletions, "gpt-4o", &body);
            let took = started.elapsed();
            worst = worst.max(took);
            println!("{name:>22}: {n:>9} tokens in {took:?}");
        }
        println!("worst: {worst:?}");
    }

    #[test]
    fn approximation_is_ceil_chars_over_four() {
        assert_eq!(Tokenizer::Approx.count("abcd"), 1);
        assert_eq!(Tokenizer::Approx.count("abcde"), 2);
        assert_eq!(Tokenizer::Approx.count("ééééé"), 2, "chars, not bytes");
    }

    #[test]
    fn chat_estimate_counts_messages_and_framing() {
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "hello world"},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]}
        ]});
        let n = estimate_input_tokens(Endpoint::ChatCompletions, "gpt-4o", &body);
        // "system\nhello world\nuser\nhello world" is about 8 tokens; + 2*3 framing + 3 priming
        assert!((14..=20).contains(&n), "{n}");
        let empty = estimate_input_tokens(
            Endpoint::ChatCompletions,
            "gpt-4o",
            &json!({"messages": []}),
        );
        assert_eq!(empty, TOKENS_REPLY_PRIMING);
    }

    #[test]
    fn longer_input_estimates_more() {
        let short = json!({"prompt": "word ".repeat(10)});
        let long = json!({"prompt": "word ".repeat(1000)});
        let a = estimate_input_tokens(Endpoint::Completions, "gpt-3.5-turbo-instruct", &short);
        let b = estimate_input_tokens(Endpoint::Completions, "gpt-3.5-turbo-instruct", &long);
        assert!(b > 50 * a / 10, "{a} {b}");
    }

    #[test]
    fn embeddings_and_responses_inputs_are_counted() {
        let e = estimate_input_tokens(
            Endpoint::Embeddings,
            "some-embedder",
            &json!({"input": ["abcdefgh", "abcd"]}),
        );
        assert_eq!(e, 4, "ceil(13 chars incl. separator / 4)");
        let tokens = estimate_input_tokens(Endpoint::Embeddings, "x", &json!({"input": [1, 2, 3]}));
        assert_eq!(tokens, 3, "token arrays count one per token");
        let r = estimate_input_tokens(
            Endpoint::Responses,
            "my-model",
            &json!({"instructions": "abcd", "input": "abcd"}),
        );
        assert_eq!(r, 3);
        let items = estimate_input_tokens(
            Endpoint::Responses,
            "my-model",
            &json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]}),
        );
        assert_eq!(items, 1 + TOKENS_PER_MESSAGE);
    }

    #[test]
    fn output_limit_comes_from_the_request_or_the_default() {
        let chat = Endpoint::ChatCompletions;
        let reserved = |e, body| output_limit(e, &body, 1024).unwrap().reserved();
        let default = output_limit(chat, &json!({}), 1024).unwrap();
        assert_eq!((default.reserved(), default.from_client), (1024, false));
        assert_eq!(reserved(chat, json!({"max_tokens": 50})), 50);
        assert!(
            output_limit(chat, &json!({"max_tokens": 50}), 1024)
                .unwrap()
                .from_client
        );
        assert_eq!(
            reserved(chat, json!({"max_completion_tokens": 70, "max_tokens": 50})),
            70
        );
        let n = output_limit(chat, &json!({"max_tokens": 50, "n": 3}), 1024).unwrap();
        assert_eq!((n.per_choice, n.reserved()), (50, 150));
        let n = output_limit(chat, &json!({"n": 2}), 1024).unwrap();
        assert_eq!(
            (n.per_choice, n.reserved(), n.from_client),
            (1024, 2048, false)
        );
        assert_eq!(
            reserved(
                Endpoint::Responses,
                json!({"max_output_tokens": 9, "max_tokens": 50})
            ),
            9
        );
        assert_eq!(reserved(Endpoint::Completions, json!({"max_tokens": 8})), 8);
        let e = output_limit(Endpoint::Embeddings, &json!({"max_tokens": 5}), 1024).unwrap();
        assert_eq!((e.reserved(), e.from_client), (0, true));
        let err = output_limit(chat, &json!({"max_tokens": -1}), 1024).unwrap_err();
        assert_eq!(err.status_code(), 400);
        assert!(output_limit(chat, &json!({"max_tokens": "many"}), 1024).is_err());
    }
}
