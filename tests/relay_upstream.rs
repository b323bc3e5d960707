//! The relay end to end, upstreams: channels, TLS to the upstream, and upstream errors.
use pg_quota_tests::*;
use serde_json::Value;

#[tokio::test]
async fn channels_route_with_their_key_and_model_name_and_a_full_channel_is_429() {
    let r = relayed("pgq_e2e_channels", "'cost', 'day', 100, 'strict'", &[]).await;
    // One channel serves gpt-4o, under a renamed upstream model and its own upstream key, with
    // a strict cap of 1,000 raw tokens a day.
    let channel = r.channel("gpt-4o", "gpt-4o-2024-11-20").await;
    r.db.batch_execute(&format!(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
         VALUES ('channel', {channel}, 'tokens', 'day', 1000);
         -- pinning a channel needs a grant (the pinned requests below)
         INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id)
         VALUES ({channel}, 'key', {key_id});",
        key_id = r.key.key_id
    ))
    .await
    .unwrap();

    let usage = [("x-mock-input-tokens", "400"), ("x-mock-output-tokens", "600")];
    let resp = r.chat(chat_body(600), &usage).send().await.unwrap();
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
async fn upstream_errors_never_show_the_operators_account() {
    let r = relayed("pgq_e2e_upstream_errors", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    // A channel that serves gpt-4o under the upstream's dated model name.
    r.channel("gpt-4o", "gpt-4o-2024-11-20").await;
    let fail = |status: &'static str| r.chat(chat_body(100), &[("x-mock-fail", status)]).send();
    let shown = |error: &Value| {
        let text = error.to_string();
        assert!(!text.contains("org-"), "an organization id reached the client: {text}");
        assert!(!text.contains("2024-11-20"), "the upstream model reached the client: {text}");
        assert!(!text.contains("sk-"), "a key reached the client: {text}");
    };

    // The upstream's 429 names the operator's organization and limits: the relay's own error.
    let resp = fail("429").await.unwrap();
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    shown(&openai_error(resp, 429, "rate_limit_error", "upstream_rate_limited").await);
    // The relay's credentials refused: the client's request is fine, the relay is not.
    for status in ["401", "403"] {
        let resp = fail(status).await.unwrap();
        shown(&openai_error(resp, 502, "server_error", "upstream_auth_failed").await);
    }
    // Request errors pass, in the client's own terms.
    let resp = fail("404").await.unwrap();
    let error = openai_error(resp, 404, "invalid_request_error", "model_not_found").await;
    shown(&error);
    assert!(error["message"].as_str().unwrap().contains("gpt-4o"), "{error}");
    for status in ["400", "422"] {
        let resp = fail(status).await.unwrap();
        shown(&openai_error(resp, status.parse().unwrap(), "invalid_request_error", "invalid_request").await);
    }
    r.wait_refunds("upstream_rate_limited", 1).await;
    assert_eq!(r.reservations().await, 0);
    assert_eq!(r.ledger_rows().await, 0, "answers without usage are refunded");
    assert_no_drift(&r.db).await;
}
