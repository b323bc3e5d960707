//! The relay end to end, ingress: keys, bodies, headers and models, as a client sees them.
use pg_quota_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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
async fn large_bodies_without_a_valid_key_cannot_stall_the_relay() {
    // Reproduced: a bogus key and a 250 KB body whose message is one long word took 37 s of
    // relay CPU before its 401. Eight at once, with a key that is no key and with one of the
    // right shape that no database row knows, are all answered within 2 s, and /healthz
    // answers meanwhile.
    let r = relayed("pgq_e2e_dos", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let word = "a".repeat(250_000);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": word}]}).to_string();
    let forged = format!("sk-pgq-{}-{}", "0".repeat(12), "0".repeat(64));
    for key in ["nonsense", forged.as_str()] {
        let started = Instant::now();
        let flood: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(
                    r.http
                        .post(format!("{}/v1/chat/completions", r.relay.url))
                        .bearer_auth(key)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(10))
                        .send(),
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let health = r
            .http
            .get(format!("{}/healthz", r.relay.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("/healthz answers during the flood");
        assert_eq!(health.status(), 200);
        for request in flood {
            let resp = request.await.unwrap().expect("answered");
            openai_error(resp, 401, "invalid_request_error", "invalid_api_key").await;
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{key}: 8 requests took {took:?}");
    }
    assert_eq!(r.reservations().await, 0);
    assert!(mock_requests(&r.mock).await.is_empty());
}

#[tokio::test]
async fn only_allowed_client_headers_reach_the_upstream() {
    let r = relayed("pgq_e2e_forwarded", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let upstream = format!("{}/v1", r.mock.url);
    let relay = Server::relay_bare(&r.dsn, &upstream, &[]).await;
    let r = Relayed { relay, ..r };
    let sent = [
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("x-stainless-lang", "python"),
        ("openai-beta", "assistants=v2"),
        ("idempotency-key", "stainless-retry-1"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-host", "evil.example"),
        ("x-http-method-override", "DELETE"),
        ("x-amz-security-token", "t0k3n"),
        ("x-mock-output-tokens", "7"),
        ("x-custom", "1"),
    ];
    let mut req = r.chat(chat_body(100), &[]);
    for (name, value) in sent {
        req = req.header(name, value);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let seen = mock_requests(&r.mock).await;
    let headers = seen[0]["headers"].as_object().unwrap();
    for passed in ["user-agent", "x-stainless-lang", "openai-beta", "idempotency-key"] {
        assert!(headers.contains_key(passed), "{passed} is on the allow list: {headers:?}");
    }
    for held in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-http-method-override",
        "x-amz-security-token",
        "x-mock-output-tokens",
        "x-custom",
    ] {
        assert!(!headers.contains_key(held), "{held} must not reach the upstream: {headers:?}");
    }
    assert_eq!(headers["user-agent"], "OpenAI/Python 1.99.0");
    // so a client cannot report its own usage to the upstream: the mock's default output
    let (_, output, _, _, _) = r.ledger_row(&id).await;
    assert_eq!(output, 16);

    // An operator extends the list with --forward-header (the tests' mock controls).
    let extend = ["--forward-header", "x-mock-*", "--forward-header", "x-custom"];
    let relay = Server::relay_bare(&r.dsn, &upstream, &extend).await;
    let r = Relayed { relay, ..r };
    let mut req = r.chat(chat_body(100), &[]);
    for (name, value) in sent {
        req = req.header(name, value);
    }
    let resp = req.send().await.unwrap();
    let id = request_id(&resp);
    let (_, output, _, _, _) = r.ledger_row(&id).await;
    assert_eq!(output, 7, "x-mock-output-tokens reached the mock");
    let seen = mock_requests(&r.mock).await;
    let headers = seen[1]["headers"].as_object().unwrap();
    assert!(headers.contains_key("x-custom"));
    assert!(!headers.contains_key("x-http-method-override"));
}
