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

