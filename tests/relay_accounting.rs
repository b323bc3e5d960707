//! The relay end to end, accounting: what each relayed request is charged, streamed or not,
//! whatever the upstream or the client does, and how windows refuse what they cannot hold.
use futures::StreamExt;
use pg_quota_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn non_streamed_usage_is_charged_exactly_as_the_upstream_reported_it() {
    let r = relayed("pgq_e2e_plain", "'cost', 'day', 10, 'strict'", &[]).await;
    r.db.batch_execute(&format!(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) \
         VALUES ('user', {}, 'tokens', 'day', 1000000)",
        r.key.user_id
    ))
    .await
    .unwrap();

    let resp = r
        .chat(
            chat_body(100),
            &[
                ("x-mock-input-tokens", "1000"),
                ("x-mock-output-tokens", "50"),
                ("x-mock-cached-tokens", "400"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["prompt_tokens"], 1000);
    assert_eq!(body["usage"]["completion_tokens"], 50);

    let (input, output, cached, billed, cost) = r.ledger_row(&id).await;
    assert_eq!((input, output, cached, billed), (1000, 50, 400, true));
    // 600 fresh input × $2.50/M + 400 cached × $1.25/M + 50 output × $10/M
    assert!(
        r.cost_is(&cost, "0.0025").await,
        "cost {cost}, expected 0.0025"
    );
    let status = r.status().await;
    assert_eq!(
        status,
        [
            ("cost".into(), "0.0025".into(), "0".into()),
            ("tokens".into(), "1050".into(), "0".into())
        ],
        "counters hold exactly the settled usage, nothing reserved"
    );
    assert_eq!(r.reservations().await, 0);
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn streamed_usage_is_charged_and_the_usage_chunk_shown_only_when_asked_for() {
    let r = relayed("pgq_e2e_stream", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let mut body = chat_body(100);
    body["stream"] = json!(true);

    // 20 tokens, 40 ms apart: a relay that buffered would deliver them all at once at the end.
    let resp = r
        .chat(
            body.clone(),
            &[
                ("x-mock-input-tokens", "30"),
                ("x-mock-output-tokens", "20"),
                ("x-mock-chunk-delay-ms", "40"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let id = request_id(&resp);
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        arrivals.push(Instant::now());
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        arrivals.len() >= 10 && spread >= Duration::from_millis(500),
        "chunks must arrive as they are produced: {} reads over {spread:?}",
        arrivals.len()
    );
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(content.len(), 20);
    assert!(
        chunks.iter().all(|c| !c["usage"].is_object()),
        "the client did not ask for usage, so it must not see a usage chunk: {text}"
    );
    // ... yet the relay asked the upstream for it, and charged it.
    let (input, output, _, billed, cost) = r.ledger_row(&id).await;
    assert_eq!((input, output, billed), (30, 20, true));
    assert!(r.cost_is(&cost, "0.000275").await, "cost {cost}"); // 30 × 2.50 + 20 × 10, per million

    // A client that asks for usage gets exactly one usage chunk, the one that was charged.
    body["stream_options"] = json!({"include_usage": true});
    let resp = r
        .chat(
            body,
            &[
                ("x-mock-input-tokens", "31"),
                ("x-mock-output-tokens", "21"),
                ("x-mock-chunk-delay-ms", "0"),
            ],
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let events = sse_data(&resp.text().await.unwrap());
    let usage: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| c["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{events:?}");
    assert_eq!(usage[0]["choices"], json!([]));
    assert_eq!(
        (
            usage[0]["usage"]["prompt_tokens"].as_i64(),
            usage[0]["usage"]["completion_tokens"].as_i64()
        ),
        (Some(31), Some(21))
    );
    let (input, output, _, _, _) = r.ledger_row(&id).await;
    assert_eq!((input, output), (31, 21));
    assert_eq!(
        r.status().await,
        [("tokens".into(), "102".into(), "0".into())]
    );
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn an_upstream_that_reports_no_usage_is_charged_the_relays_own_count() {
    // Otherwise such an upstream would be a way around every token quota.
    let r = relayed("pgq_e2e_no_usage", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let mock = [("x-mock-omit-usage", "1"), ("x-mock-output-tokens", "12")];
    let resp = r.chat(chat_body(100), &mock).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let plain = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("usage").is_none(), "the upstream sent no usage: {body}");
    let mut streamed = chat_body(100);
    streamed["stream"] = json!(true);
    let resp = r.chat(streamed, &mock).send().await.unwrap();
    let stream = request_id(&resp);
    let text = resp.text().await.unwrap();
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"));

    for id in [plain, stream] {
        let (input, output, _, billed, _) = r.ledger_row(&id).await;
        assert!(billed && input > 0, "{id}: the prompt is charged at the estimate");
        assert_eq!(output, 12, "{id}: the output the relay counted");
    }
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn spent_strict_window_answers_429_in_openai_shape_with_retry_after() {
    let r = relayed("pgq_e2e_strict", "'tokens', 'day', 1000, 'strict'", &[]).await;
    // Each request really uses 400 + 100 tokens; its estimate is about 10 + max_tokens.
    let usage = [
        ("x-mock-input-tokens", "400"),
        ("x-mock-output-tokens", "100"),
    ];
    let first = r.chat(chat_body(100), &usage).send().await.unwrap();
    assert_eq!(first.status(), 200);
    r.wait_ledger_rows(1).await;

    // 500 tokens left: strict refuses up front a request that could need more ...
    let resp = r.chat(chat_body(600), &usage).send().await.unwrap();
    let error = openai_error(
        resp,
        429,
        "rate_limit_error",
        "token_quota_policy_exhausted",
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("would exceed"),
        "{error}"
    );
    // ... and still admits one that fits, which spends the window.
    let second = r.chat(chat_body(100), &usage).send().await.unwrap();
    assert_eq!(second.status(), 200);
    r.wait_ledger_rows(2).await;

    let resp = r.chat(chat_body(1), &usage).send().await.unwrap();
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=86_400).contains(&retry_after),
        "retry after the day window ends: {retry_after}"
    );
    // The refusing window's rate-limit headers, and no SDK retry of a quota decision.
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(header("x-ratelimit-limit-tokens").as_deref(), Some("1000"));
    assert_eq!(header("x-ratelimit-remaining-tokens").as_deref(), Some("0"));
    let reset = reset_seconds(&header("x-ratelimit-reset-tokens").unwrap());
    assert!(reset.abs_diff(retry_after) <= 1, "reset {reset} vs Retry-After {retry_after}");
    assert_eq!(header("x-should-retry").as_deref(), Some("false"));
    let error = openai_error(
        resp,
        429,
        "rate_limit_error",
        "token_quota_policy_exhausted",
    )
    .await;
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("resets in"),
        "the recovery time in words: {message}"
    );
    assert!(
        !message.contains("1000") && !message.contains("500"),
        "no used or limit amounts in the client message: {message}"
    );
    assert_eq!(
        mock_requests(&r.mock).await.len(),
        2,
        "refused requests never reach the upstream"
    );
    assert_eq!(
        r.status().await,
        [("tokens".into(), "1000".into(), "0".into())]
    );
    assert_eq!(r.reservations().await, 0);
}

#[tokio::test]
async fn graceful_window_admits_the_request_that_crosses_it_and_refuses_the_next() {
    let r = relayed("pgq_e2e_graceful", "'tokens', 'day', 1000, 'graceful'", &[]).await;
    let first = r
        .chat(
            chat_body(200),
            &[
                ("x-mock-input-tokens", "300"),
                ("x-mock-output-tokens", "200"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    r.wait_ledger_rows(1).await;

    // 500 left; this one may need 900+ (strict would refuse it) and really uses 800.
    let crossing = r
        .chat(
            chat_body(900),
            &[
                ("x-mock-input-tokens", "600"),
                ("x-mock-output-tokens", "200"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        crossing.status(),
        200,
        "graceful: admitted while the window is not exhausted"
    );
    let id = request_id(&crossing);
    let (input, output, _, _, _) = r.ledger_row(&id).await;
    assert_eq!(
        (input, output),
        (600, 200),
        "charged in full, past the limit"
    );

    let next = r.chat(chat_body(1), &[]).send().await.unwrap();
    assert!(next.headers().contains_key("retry-after"));
    openai_error(
        next,
        429,
        "rate_limit_error",
        "token_quota_policy_exhausted",
    )
    .await;
    let state: String =
        r.db.query_one("SELECT state FROM quota.status($1)", &[&r.key.key_id])
            .await
            .unwrap()
            .get(0);
    assert_eq!(state, "exhausted");
    assert_eq!(
        r.status().await,
        [("tokens".into(), "1300".into(), "0".into())]
    );
    assert_eq!(r.reservations().await, 0);
}

#[tokio::test]
async fn a_client_hanging_up_mid_stream_is_charged_the_upstreams_whole_usage() {
    // The upstream goes on generating (and billing) after the client left: the relay reads the
    // stream to its end for the usage chunk and charges that, hidden reasoning tokens included.
    let r = relayed("pgq_e2e_hangup", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let mut body = chat_body(500);
    body["stream"] = json!(true);
    // 100 tokens 20 ms apart: the whole stream takes 2 s.
    let resp = r
        .chat(
            body,
            &[
                ("x-mock-input-tokens", "30"),
                ("x-mock-output-tokens", "100"),
                ("x-mock-chunk-delay-ms", "20"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut chunks = resp.bytes_stream();
    read_sse(&mut chunks, &mut String::new(), Some(4)).await;
    drop(chunks); // the client hangs up

    let sql = "SELECT input_tokens, output_tokens, billed FROM quota.usage_ledger WHERE request_id = $1";
    eventually("the settlement after the upstream finished", Duration::from_secs(10), || async {
        r.db.query_opt(sql, &[&id]).await.unwrap().is_some()
    })
    .await;
    let row = r.db.query_one(sql, &[&id]).await.unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, bool>(2)),
        (30, 100, true),
        "charged the upstream's own usage, not what the client saw before it left"
    );
    assert_eq!(r.reservations().await, 0, "no reservation may remain");
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn an_upstream_timeout_or_cut_after_sending_is_charged_the_full_reservation() {
    // The upstream may bill a request it received even if its answer never arrives: such an
    // outcome is unknown, and unknown outcomes are charged at their reservation.
    let r = relayed(
        "pgq_e2e_unknown_outcome",
        "'tokens', 'day', 1000000, 'strict'",
        &["--upstream-timeout-s", "1"],
    )
    .await;
    let resp = r.chat(chat_body(100), &[("x-mock-fail", "timeout")]).send().await.unwrap();
    let timed_out = request_id(&resp);
    openai_error(resp, 504, "server_error", "upstream_timeout").await;
    let mut body = chat_body(100);
    body["stream"] = json!(true);
    let resp = r.chat(body, &[("x-mock-fail", "disconnect-mid-stream")]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let cut = request_id(&resp);
    resp.text().await.unwrap();

    for id in [timed_out, cut] {
        let (input, output, _, billed, _) = r.ledger_row(&id).await;
        assert!(billed && input > 0, "{id}: the input at its estimate");
        assert_eq!(output, 100, "{id}: the whole output that was reserved (max_tokens)");
    }
    assert_eq!(r.reservations().await, 0);
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn upstream_500_is_a_502_and_the_reservation_is_refunded() {
    let r = relayed(
        "pgq_e2e_upstream500",
        "'tokens', 'day', 1000000, 'strict'",
        &[],
    )
    .await;
    let resp = r
        .chat(chat_body(100), &[("x-mock-fail", "500")])
        .send()
        .await
        .unwrap();
    openai_error(resp, 502, "server_error", "upstream_unavailable").await;
    let mut body = chat_body(100);
    body["stream"] = json!(true);
    let resp = r
        .chat(body, &[("x-mock-fail", "500")])
        .send()
        .await
        .unwrap();
    openai_error(resp, 502, "server_error", "upstream_unavailable").await;

    r.wait_refunds("upstream_error", 2).await;
    assert_eq!(r.reservations().await, 0);
    assert_eq!(
        r.ledger_rows().await,
        0,
        "nothing is charged for a failed upstream"
    );
    assert_eq!(
        r.status().await,
        [("tokens".into(), "0".into(), "0".into())]
    );
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn a_strict_window_caps_what_the_upstream_may_write() {
    // Reproduced: a strict 5,000 tokens a day, requests without max_tokens, an upstream that
    // would write 50,000 tokens. The relay tells the upstream the output it reserved.
    let r = relayed("pgq_e2e_output_cap", "'tokens', 'day', 5000, 'strict'", &[]).await;
    let plain = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Write forever."}]});
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let endless = [("x-mock-output-tokens", "50000"), ("x-mock-chunk-delay-ms", "0")];
    let mut answered = 0;
    for n in 0..10 {
        let body = if n % 2 == 0 { plain.clone() } else { streamed.clone() };
        let resp = r.chat(body, &endless).send().await.unwrap();
        if resp.status() == 429 {
            break;
        }
        assert_eq!(resp.status(), 200);
        let id = request_id(&resp);
        let text = resp.text().await.unwrap();
        if n == 0 {
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(answer["choices"][0]["finish_reason"], "length", "cut at the limit");
        }
        r.ledger_row(&id).await;
        answered += 1;
    }
    assert!(answered >= 2, "{answered} requests answered");
    let used: i64 = r
        .db
        .query_one("SELECT used::bigint FROM quota.status($1)", &[&r.key.key_id])
        .await
        .unwrap()
        .get(0);
    assert!(used <= 5000, "a strict window of 5,000 tokens ends at {used} used");
    let seen = mock_requests(&r.mock).await;
    assert_eq!(seen[0]["body"]["max_tokens"], 1024, "the reserved output, written for the upstream");
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn every_endpoint_tells_the_upstream_the_output_it_reserved() {
    let r = relayed("pgq_e2e_output_fields", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let post = |path: &str, body: Value| {
        r.http
            .post(format!("{}/v1/{path}", r.relay.url))
            .bearer_auth(&r.key.secret)
            .json(&body)
            .send()
    };
    let cases = [
        ("chat/completions", json!({"model": "gpt-4o", "messages": []}), "max_tokens"),
        ("chat/completions", json!({"model": "o3-mini", "messages": []}), "max_completion_tokens"),
        ("completions", json!({"model": "gpt-4o", "prompt": "a"}), "max_tokens"),
        ("responses", json!({"model": "gpt-4o", "input": "a"}), "max_output_tokens"),
    ];
    for (path, body, _) in &cases {
        assert_eq!(post(path, body.clone()).await.unwrap().status(), 200, "{path}");
    }
    // a limit the client gives is the one reserved and passed on as it is
    let given = json!({"model": "gpt-4o", "max_completion_tokens": 77, "messages": []});
    assert_eq!(post("chat/completions", given).await.unwrap().status(), 200);
    let seen = mock_requests(&r.mock).await;
    for (n, (path, _, field)) in cases.iter().enumerate() {
        assert_eq!(seen[n]["body"][field], 1024, "{path}: {}", seen[n]["body"]);
    }
    assert_eq!(seen[4]["body"]["max_completion_tokens"], 77);
    assert!(seen[4]["body"].get("max_tokens").is_none(), "{}", seen[4]["body"]);
    r.wait_ledger_rows(5).await;
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn unbilled_settlements_are_counted_in_metrics_by_reason() {
    let r = relayed("pgq_e2e_unbilled", "'requests', 'day', 1000, 'strict'", &[]).await;
    let body = json!({"model": "model-without-price", "max_tokens": 10, "messages": []});
    let resp = r.chat(body, &[]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let (_, _, _, billed, _) = r.ledger_row(&id).await;
    assert!(!billed);
    let metrics = r.http.get(format!("{}/metrics", r.relay.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"pgq_relay_unbilled_requests_total{reason="price_not_found"} 1"#),
        "{metrics}"
    );
}
