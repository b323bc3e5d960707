//! The real relay, end to end: a client talks HTTP to `pg-quota-relay serve`, which calls the
//! engine in a real database and forwards to the mock upstream. Each test checks what a user
//! of the relay would notice: the answer, its headers, and what the ledger and counters say.
use futures::StreamExt;
use pg_quota_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Settlement runs after the reply has gone out; this bounds how long a test waits for it.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);

/// A database with priced models, a key, the mock upstream and a relay in front of it.
struct Relayed {
    db: Client,
    key: Key,
    mock: Server,
    relay: Server,
    http: reqwest::Client,
}

/// `policy_values` as in `key_with_policy`; `relay_args` are extra `serve` flags.
async fn relayed(dbname: &str, policy_values: &str, relay_args: &[&str]) -> Relayed {
    let dsn = fresh_database(dbname).await;
    relayed_on(&dsn, policy_values, relay_args).await
}

async fn relayed_on(dsn: &str, policy_values: &str, relay_args: &[&str]) -> Relayed {
    let db = connect(dsn).await;
    db.batch_execute(
        "INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok, cached_input_per_mtok) \
         VALUES ('gpt-4o', 2.50, 10.00, 1.25)",
    )
    .await
    .unwrap();
    let key = key_with_policy(&db, "alice", policy_values).await;
    let mock = Server::mock_upstream().await;
    let relay = Server::relay(dsn, &format!("{}/v1", mock.url), relay_args).await;
    Relayed {
        db,
        key,
        mock,
        relay,
        http: reqwest::Client::new(),
    }
}

impl Relayed {
    /// `POST /v1/chat/completions` with the key; `mock` are `x-mock-*` headers for the upstream.
    fn chat(&self, body: Value, mock: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(format!("{}/v1/chat/completions", self.relay.url))
            .bearer_auth(&self.key.secret)
            .json(&body);
        for (name, value) in mock {
            req = req.header(*name, *value);
        }
        req
    }

    /// Waits for the ledger row of `request_id`; returns
    /// (input, output, cached, billed, cost as text).
    async fn ledger_row(&self, request_id: &str) -> (i64, i64, i64, bool, String) {
        let sql = "SELECT input_tokens, output_tokens, cached_tokens, billed, cost::text \
                   FROM quota.usage_ledger WHERE request_id = $1";
        eventually(
            &format!("ledger row of {request_id}"),
            SETTLE_WITHIN,
            || async {
                self.db
                    .query_opt(sql, &[&request_id])
                    .await
                    .unwrap()
                    .is_some()
            },
        )
        .await;
        let r = self.db.query_one(sql, &[&request_id]).await.unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    }

    async fn ledger_rows(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM quota.usage_ledger", &[])
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_ledger_rows(&self, n: i64) {
        eventually(&format!("{n} ledger rows"), SETTLE_WITHIN, || async {
            self.ledger_rows().await == n
        })
        .await;
    }

    /// Waits until `n` reservations have been refunded for `reason`.
    async fn wait_refunds(&self, reason: &str, n: i64) {
        let sql = "SELECT count(*) FROM quota.released WHERE kind = 'refunded' AND reason = $1";
        eventually(&format!("{n} refunds ({reason})"), SETTLE_WITHIN, || async {
            self.db.query_one(sql, &[&reason]).await.unwrap().get::<_, i64>(0) == n
        })
        .await;
    }

    async fn reservations(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM quota.reservation", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// `used` and `reserved` of each policy of the key (`quota.status`), as text, by metric.
    async fn status(&self) -> Vec<(String, String, String)> {
        self.db
            .query(
                "SELECT metric, used::text, reserved::text FROM quota.status($1) ORDER BY policy_id",
                &[&self.key.key_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Is `cost` (text from the ledger) exactly `expected`? Compared as NUMERIC in SQL.
    async fn cost_is(&self, cost: &str, expected: &str) -> bool {
        self.db
            .query_one(
                "SELECT $1::text::numeric = $2::text::numeric",
                &[&cost, &expected],
            )
            .await
            .unwrap()
            .get(0)
    }
}

fn request_id(resp: &reqwest::Response) -> String {
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req_"), "{id}");
    id
}

/// Asserts the OpenAI error shape `{"error": {"message", "type", "param", "code"}}` with this
/// status, type and code; returns the error object.
async fn openai_error(resp: reqwest::Response, status: u16, kind: &str, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let body: Value = resp.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert!(error.as_object().unwrap().contains_key("param"), "{body}");
    error.clone()
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// Appends what a response stream delivers to `text` until it holds `events` SSE data events,
/// or (None) until the stream ends.
async fn read_sse<B: AsRef<[u8]>>(
    chunks: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    text: &mut String,
    events: Option<usize>,
) {
    while events.is_none_or(|n| sse_data(text).len() < n) {
        let Some(chunk) = chunks.next().await else {
            assert!(events.is_none(), "the stream ended before {events:?} events: {text}");
            return;
        };
        text.push_str(std::str::from_utf8(chunk.unwrap().as_ref()).unwrap());
    }
}

fn chat_body(max_tokens: i64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something."}]})
}

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
            chat_body(100),
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
async fn client_hanging_up_mid_stream_is_charged_for_what_was_produced() {
    let r = relayed("pgq_e2e_hangup", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let mut body = chat_body(500);
    body["stream"] = json!(true);
    // 200 tokens 50 ms apart: the whole stream would take 10 s.
    let resp = r
        .chat(
            body,
            &[
                ("x-mock-output-tokens", "200"),
                ("x-mock-chunk-delay-ms", "50"),
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

    let (input, output, _, billed, _) = r.ledger_row(&id).await;
    assert!(billed);
    assert!(
        input > 0,
        "the prompt was processed: charged at the estimate"
    );
    assert!(
        (3..200).contains(&output),
        "charged for the output produced before the hang-up, not all 200 and not nothing: {output}"
    );
    assert_eq!(r.reservations().await, 0, "no reservation may remain");
    assert_eq!(r.status().await[0].2, "0");
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn sigterm_lets_a_stream_in_flight_finish_and_settle_then_the_relay_exits() {
    let mut r = relayed("pgq_e2e_sigterm", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let mut body = chat_body(500);
    body["stream"] = json!(true);
    // 20 tokens 100 ms apart: about 2 s of stream.
    let mock = [("x-mock-output-tokens", "20"), ("x-mock-chunk-delay-ms", "100")];
    let resp = r.chat(body, &mock).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut chunks = resp.bytes_stream();
    let mut text = String::new();
    read_sse(&mut chunks, &mut text, Some(2)).await;

    let pid = r.relay.child.id().expect("the relay runs").to_string();
    let kill = tokio::process::Command::new("kill").args(["-TERM", &pid]).status();
    assert!(kill.await.unwrap().success());
    // New connections are refused at once...
    eventually("the listener closed", Duration::from_secs(5), || async {
        r.http.get(format!("{}/healthz", r.relay.url)).send().await.is_err()
    })
    .await;
    // ...while the stream in flight runs to its end,
    read_sse(&mut chunks, &mut text, None).await;
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"), "{text}");
    // is settled in full, and then the relay exits cleanly.
    let exit = tokio::time::timeout(Duration::from_secs(10), r.relay.child.wait()).await;
    assert!(exit.expect("the relay exits after its stream").unwrap().success());
    let (_, output, _, billed, _) = r.ledger_row(&id).await;
    assert_eq!((output, billed), (20, true));
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
async fn database_outage_answers_503_and_the_relay_recovers_without_restart() {
    // A cluster of its own: stopping the shared one would break the other tests.
    let cluster = PrivateCluster::start("e2e-outage").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_outage").await;
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let healthz = || async {
        r.http
            .get(format!("{}/healthz", r.relay.url))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(
        r.chat(chat_body(10), &[]).send().await.unwrap().status(),
        200
    );
    r.wait_ledger_rows(1).await;

    cluster.stop().await;
    for _ in 0..3 {
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        openai_error(resp, 503, "server_error", "quota_database_unavailable").await;
    }
    assert_eq!(healthz().await, 503);
    assert_eq!(
        mock_requests(&r.mock).await.len(),
        1,
        "fail closed: nothing is forwarded unaccounted"
    );

    cluster.start_again().await;
    let recovered = || async { r.chat(chat_body(10), &[]).send().await.unwrap().status() == 200 };
    eventually(
        "requests pass again once the database is back",
        Duration::from_secs(20),
        recovered,
    )
    .await;
    assert_eq!(healthz().await, 200);
    let db = connect(&dsn).await;
    // the request before the outage and the first one after it, each settled once
    eventually("every admitted request settled", SETTLE_WITHIN, || async {
        db.query_one("SELECT count(*) = 0 FROM quota.reservation", &[])
            .await
            .unwrap()
            .get(0)
    })
    .await;
    let ledger: i64 = db
        .query_one("SELECT count(*) FROM quota.usage_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ledger, 2);
    drop(r); // relay and mock go before the cluster
}

#[tokio::test]
async fn a_request_in_flight_when_the_database_goes_away_is_charged_once_it_is_back() {
    let cluster = PrivateCluster::start("e2e-settle-outage").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_settle_outage").await;
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    // Admitted, then the database stops while the upstream works (2 s) and stays away for 10 s.
    let mock = [("x-mock-latency-ms", "2000"), ("x-mock-output-tokens", "9")];
    let pending = tokio::spawn(r.chat(chat_body(100), &mock).send());
    let forwarded = || async { mock_requests(&r.mock).await.len() == 1 };
    eventually("the request reached the upstream", Duration::from_secs(5), forwarded).await;
    cluster.stop().await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the answer does not wait for its settlement");
    let id = request_id(&resp);
    tokio::time::sleep(Duration::from_secs(10)).await;

    cluster.start_again().await;
    let db = connect(&dsn).await;
    let sql = "SELECT output_tokens, billed FROM quota.usage_ledger WHERE request_id = $1";
    eventually("the settlement once the database is back", Duration::from_secs(20), || async {
        db.query_opt(sql, &[&id]).await.unwrap().is_some()
    })
    .await;
    let row = db.query_one(sql, &[&id]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (9, true));
    let reservations: i64 = db.query_one("SELECT count(*) FROM quota.reservation", &[]).await.unwrap().get(0);
    assert_eq!(reservations, 0);
    assert_no_drift(&db).await;
    drop(r); // relay and mock go before the cluster
}

#[tokio::test]
async fn models_are_listed_for_a_usable_key_and_refused_like_a_request_otherwise() {
    let r = relayed("pgq_e2e_models", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let models = |secret: String| {
        r.http
            .get(format!("{}/v1/models", r.relay.url))
            .bearer_auth(secret)
            .send()
    };
    let resp = models(r.key.secret.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "gpt-4o", "{list}");

    // (the subject's table and id column, the change, its code)
    let key = ("api_key", "key_id", r.key.key_id);
    let user = ("app_user", "user_id", r.key.user_id);
    for ((table, column, id), set, unset, code) in [
        (key, "enabled = false", "enabled = true", "key_disabled"),
        (user, "enabled = false", "enabled = true", "user_disabled"),
        (key, "expires_at = now()", "expires_at = NULL", "key_expired"),
    ] {
        let update = |set: &str| format!("UPDATE quota.{table} SET {set} WHERE {column} = {id}");
        r.db.batch_execute(&update(set)).await.unwrap();
        let resp = models(r.key.secret.clone()).await.unwrap();
        openai_error(resp, 403, "permission_error", code).await;
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        openai_error(resp, 403, "permission_error", code).await;
        r.db.batch_execute(&update(unset)).await.unwrap();
    }
    let resp = models("sk-pgq-unknown".into()).await.unwrap();
    openai_error(resp, 401, "invalid_request_error", "invalid_api_key").await;
    assert_eq!(models(r.key.secret.clone()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_reserve_nothing() {
    let r = relayed(
        "pgq_e2e_bad",
        "'tokens', 'day', 1000000, 'strict'",
        &["--max-body-bytes", "1024"],
    )
    .await;
    let post = |body: String| {
        r.http
            .post(format!("{}/v1/chat/completions", r.relay.url))
            .bearer_auth(&r.key.secret)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let oversized =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    openai_error(
        post(oversized.to_string()).await.unwrap(),
        413,
        "invalid_request_error",
        "request_too_large",
    )
    .await;
    openai_error(
        post("{\"model\": \"gpt-4o\", ".into()).await.unwrap(),
        400,
        "invalid_request_error",
        "invalid_json",
    )
    .await;
    let error = openai_error(
        post(json!({"messages": [{"role": "user", "content": "hi"}]}).to_string())
            .await
            .unwrap(),
        400,
        "invalid_request_error",
        "missing_required_parameter",
    )
    .await;
    assert_eq!(error["param"], "model");

    assert!(
        mock_requests(&r.mock).await.is_empty(),
        "nothing reaches the upstream"
    );
    assert_eq!(r.reservations().await, 0);
    assert_eq!(r.ledger_rows().await, 0);
    assert_eq!(
        r.status().await,
        [("tokens".into(), "0".into(), "0".into())]
    );
    // The key itself is fine: a well-formed request passes.
    assert_eq!(post(chat_body(10).to_string()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn relayed_responses_carry_ratelimit_headers_and_the_request_id() {
    let r = relayed("pgq_e2e_headers", "'requests', 'day', 10, 'strict'", &[]).await;
    let seconds_to_reset: i64 = r
        .db
        .query_one(
            "SELECT ceil(extract(epoch FROM next_reset - quota.clock()))::bigint FROM quota.status($1)",
            &[&r.key.key_id],
        )
        .await
        .unwrap()
        .get(0);

    let mut stream_body = chat_body(10);
    stream_body["stream"] = json!(true);
    let mut ids = Vec::new();
    for (n, body) in [chat_body(10), stream_body].into_iter().enumerate() {
        let resp = r.chat(body, &[]).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers().clone();
        assert_eq!(h["x-ratelimit-limit-requests"], "10");
        assert_eq!(
            h["x-ratelimit-remaining-requests"],
            (9 - n).to_string().as_str(),
            "this request counted"
        );
        let reset = reset_seconds(h["x-ratelimit-reset-requests"].to_str().unwrap()) as i64;
        assert!(
            (reset - seconds_to_reset).abs() <= 5,
            "reset in {reset} s, window ends in {seconds_to_reset} s"
        );
        let id = request_id(&resp);
        resp.text().await.unwrap();
        r.ledger_row(&id).await; // the id names the charge in the ledger
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let seen: Vec<Value> = mock_requests(&r.mock).await;
    let upstream_ids: Vec<&str> = seen
        .iter()
        .map(|s| s["headers"]["x-request-id"].as_str().unwrap())
        .collect();
    assert_eq!(upstream_ids, ids, "the upstream sees the same request id");
}

#[tokio::test]
async fn a_moderate_load_runs_on_the_connections_used_last() {
    let dsn = fresh_database("pgq_e2e_lifo").await;
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    r.wait_ledger_rows(1).await;
    let relay_backends = |filter: &'static str| {
        let db = &r.db;
        async move {
            let sql = format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-quota-relay' \
                 AND datname = current_database() {filter}"
            );
            db.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0)
        }
    };

    // Eight requests at once, each held at admit by another transaction's lock on the key's
    // counter: the pool opens a connection for each.
    let locker = connect(&dsn).await;
    locker.batch_execute("BEGIN; SELECT 1 FROM quota.counter FOR UPDATE").await.unwrap();
    let burst: Vec<_> = (0..8).map(|_| tokio::spawn(r.chat(chat_body(10), &[]).send())).collect();
    eventually("8 admits waiting for the lock", Duration::from_secs(10), || async {
        relay_backends("AND wait_event_type = 'Lock'").await == 8
    })
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    for request in burst {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    r.wait_ledger_rows(9).await;
    assert!(relay_backends("").await >= 8, "the pool holds a connection per request of the burst");

    // Then one request at a time: they run on the connection used last (and one more for the
    // settle still running when the next admit comes), not in turn on all of them, so a
    // moderate load keeps a few backends warm (their plan and policy caches).
    let since: std::time::SystemTime = r.db.query_one("SELECT clock_timestamp()", &[]).await.unwrap().get(0);
    for _ in 0..10 {
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    r.wait_ledger_rows(19).await;
    let used = r
        .db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-quota-relay' \
             AND datname = current_database() AND state_change > $1",
            &[&since],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert!((1..=3).contains(&used), "{used} connections served 10 requests in a row");
}

#[tokio::test]
async fn channels_route_with_their_key_and_model_name_and_a_full_channel_is_429() {
    let r = relayed("pgq_e2e_channels", "'cost', 'day', 100, 'strict'", &[]).await;
    // One channel serves gpt-4o, under a renamed upstream model and its own upstream key, with
    // a strict cap of 1,000 raw tokens a day.
    let channel: i64 = r
        .db
        .query_one(
            "INSERT INTO quota.channel (name, base_url, api_key) VALUES ('acct-1', $1, 'sk-channel-1')
             RETURNING channel_id",
            &[&format!("{}/v1", r.mock.url)],
        )
        .await
        .unwrap()
        .get(0);
    r.db.batch_execute(&format!(
        "INSERT INTO quota.channel_model VALUES ({channel}, 'gpt-4o', 'gpt-4o-2024-11-20');
         INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
         VALUES ('channel', {channel}, 'tokens', 'day', 1000);"
    ))
    .await
    .unwrap();

    let usage = [("x-mock-input-tokens", "400"), ("x-mock-output-tokens", "600")];
    let resp = r.chat(chat_body(100), &usage).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    r.wait_ledger_rows(1).await;
    let seen = mock_requests(&r.mock).await;
    assert_eq!(seen[0]["authorization"], "Bearer sk-channel-1", "the channel's own upstream key");
    assert_eq!(seen[0]["body"]["model"], "gpt-4o-2024-11-20", "the channel's model name");
    let row = r
        .db
        .query_one("SELECT channel_id, model, input_tokens + output_tokens FROM quota.usage_ledger", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(channel));
    assert_eq!(row.get::<_, String>(1), "gpt-4o", "the ledger keeps the client's model");
    assert_eq!(row.get::<_, i64>(2), 1000);

    // The channel is full: pinned to it, the client gets the channel's own 429 ...
    let resp = r
        .chat(chat_body(1), &usage)
        .header("x-pgq-channel-id", channel.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    // The cap is the rate limit the client sees: none of it left until it resets.
    let header = |resp: &reqwest::Response, name: &str| {
        resp.headers().get(name).map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens").as_deref(), Some("1000"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens").as_deref(), Some("0"));
    let reset = reset_seconds(&header(&resp, "x-ratelimit-reset-tokens").unwrap());
    let retry_after: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    assert!(reset.abs_diff(retry_after) <= 1, "reset {reset} vs Retry-After {retry_after}");
    openai_error(resp, 429, "rate_limit_error", "channel_quota_exhausted").await;
    // ... and unpinned, no channel is left for the model.
    let resp = r.chat(chat_body(1), &usage).send().await.unwrap();
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens").as_deref(), Some("0"));
    openai_error(resp, 429, "rate_limit_error", "all_channels_exhausted").await;
    assert_eq!(mock_requests(&r.mock).await.len(), 1, "refused requests never reach the upstream");
    assert_eq!(r.reservations().await, 0);
    assert_no_drift(&r.db).await;
}

/// A CA of the test's own and a certificate it issued for 127.0.0.1 and localhost.
struct TestPki {
    ca_pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "pg_quota test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    TestPki { ca_pem: ca.pem(), cert, key, ca, ca_key }
}

impl TestPki {
    /// A client certificate for the role `cn`, issued by this CA: its PEM and its key's PEM.
    fn client(&self, cn: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `pem` to a file of its own; returns its path.
fn pem_file(name: &str, pem: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("pgq-e2e-{name}-{}.pem", std::process::id()));
    std::fs::write(&path, pem).unwrap();
    path
}

/// An https front for the mock upstream, as a real upstream would be: TLS with the
/// certificate of `pki`, relaying the decrypted bytes to the mock. Returns its base URL.
async fn https_front(mock: &Server, pki: &TestPki) -> String {
    use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.der().clone()],
            PrivateKeyDer::Pkcs8(pki.key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("https://{}", listener.local_addr().unwrap());
    let backend = mock.url.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // a client that rejects the certificate ends here
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(&backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    front
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_trusted_cas() {
    let dsn = fresh_database("pgq_e2e_https").await;
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let pki = test_pki();
    let front = https_front(&r.mock, &pki).await;
    let ca_file = pem_file("upstream-ca", &pki.ca_pem);

    // Trusting the CA: the request goes through TLS to the upstream and is charged.
    let relay = Server::relay(
        &dsn,
        &format!("{front}/v1"),
        &["--upstream-ca-file", ca_file.to_str().unwrap()],
    )
    .await;
    let r = Relayed { relay, ..r };
    let resp = r
        .chat(chat_body(100), &[("x-mock-output-tokens", "7")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let (_, output, _, billed, _) = r.ledger_row(&id).await;
    assert_eq!((output, billed), (7, true));
    assert_eq!(mock_requests(&r.mock).await.len(), 1);

    // Not trusting it (a certificate no system or built-in root vouches for): 502, refunded,
    // and nothing reached the upstream.
    let relay = Server::relay(&dsn, &format!("{front}/v1"), &[]).await;
    let r = Relayed { relay, ..r };
    let resp = r.chat(chat_body(100), &[]).send().await.unwrap();
    openai_error(resp, 502, "server_error", "upstream_unavailable").await;
    r.wait_refunds("upstream_unreachable", 1).await;
    assert_eq!(r.ledger_rows().await, 1);
    assert_eq!(mock_requests(&r.mock).await.len(), 1);
    assert_eq!(r.reservations().await, 0);
    assert_no_drift(&r.db).await;
    std::fs::remove_file(&ca_file).unwrap();
}

#[tokio::test]
async fn the_database_connection_uses_tls_as_its_sslmode_and_ca_file_say() {
    // A cluster of its own that refuses TCP connections without TLS.
    let cluster = PrivateCluster::start("e2e-dbtls").await;
    let pki = test_pki();
    cluster.require_tls(&pki.cert.pem(), &pki.key.serialize_pem(), &pki.ca_pem).await;
    let setup_dsn = fresh_database_at(&cluster.socket_dsn(), "pgq_e2e_dbtls").await;
    let r = relayed_on(&setup_dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let tcp = format!("{} dbname=pgq_e2e_dbtls", cluster.dsn());
    let upstream = format!("{}/v1", r.mock.url);
    let right_ca = pem_file("db-ca", &pki.ca_pem);
    let other_ca = pem_file("db-other-ca", &test_pki().ca_pem);

    // Encrypted: sslmode=require without a CA file, and the default sslmode with the CA file
    // (verified). Either relay serves a request end to end.
    let mut r = r;
    for (url, extra) in [
        (format!("{tcp} sslmode=require"), vec![]),
        (tcp.clone(), vec!["--database-ca-file", right_ca.to_str().unwrap()]),
    ] {
        r.relay = Server::relay(&url, &upstream, &extra).await;
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{url} {extra:?}");
        let id = request_id(&resp);
        assert!(r.ledger_row(&id).await.3, "billed");
    }
    assert_no_drift(&r.db).await;

    // Refused at start-up, with the cause: no TLS where the server requires it, and a server
    // certificate that the CA file does not vouch for.
    let cause = refused_start(&format!("{tcp} sslmode=disable"), &[]).await;
    assert!(cause.contains("cannot reach the database") && cause.contains("no encryption"), "{cause}");
    let cause = refused_start(&tcp, &["--database-ca-file", other_ca.to_str().unwrap()]).await;
    assert!(cause.contains("cannot reach the database") && cause.contains("certificate"), "{cause}");

    // A role that logs in with a client certificate (pg_hba `cert`), with no more rights than
    // quota_relay: with the certificate and its key, the relay serves a request; without
    // them, the database refuses it at start-up.
    r.db.batch_execute("CREATE ROLE cert_login LOGIN IN ROLE quota_relay").await.unwrap();
    let (client_pem, client_key) = pki.client("cert_login");
    let (cert_file, key_file) = (pem_file("db-client", &client_pem), pem_file("db-client-key", &client_key));
    let as_cert_login = format!("{tcp} user=cert_login");
    let client = [
        "--database-cert-file",
        cert_file.to_str().unwrap(),
        "--database-key-file",
        key_file.to_str().unwrap(),
    ];
    r.relay = Server::relay(&as_cert_login, &upstream, &client).await;
    let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(r.ledger_row(&id).await.3, "billed");
    let cause = refused_start(&as_cert_login, &[]).await;
    assert!(cause.contains("cannot reach the database") && cause.contains("certificate"), "{cause}");
    assert_no_drift(&r.db).await;
    for file in [right_ca, other_ca, cert_file, key_file] {
        std::fs::remove_file(file).unwrap();
    }
}

/// Runs `serve` against `database_url`, expecting it to stop at start-up with exit code 2;
/// returns what it printed on stderr.
async fn refused_start(database_url: &str, extra: &[&str]) -> String {
    let bin = std::env::var("PGQ_RELAY_BIN").expect("PGQ_RELAY_BIN is set by scripts/test.sh");
    let run = tokio::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("DATABASE_URL", database_url)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the relay gave up within 30 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}
