//! Leaks of the engine that need a real server to show: here, API keys in the server log.
//! The relay logs in as the role `sql/examples/relay_role.sql` sets up (a member of
//! quota_relay with no bind parameters logged), as `scripts/run.sh` and `docker/` do.
use pg_quota_tests::*;
use std::time::Duration;

/// With `log_statement = 'all'`, a run of requests through the real relay, logged in as the
/// documented relay role, leaves no key secret in the server log (the statements themselves
/// are logged, so the test sees the log it checks).
#[tokio::test]
async fn a_run_of_requests_as_the_relay_role_writes_no_key_to_the_server_log() {
    let dsn = fresh_database("pgq_engine_log").await;
    let db = connect(&dsn).await;
    relay_role(&dsn, "pgq_log_relay").await;
    db.batch_execute("ALTER DATABASE pgq_engine_log SET log_statement = 'all'").await.unwrap();
    db.batch_execute(
        "INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-4o', 2.50, 10.00)",
    )
    .await
    .unwrap();
    let key = key_with_policy(&db, "logged", "'requests', 'day', 100, 'strict'").await;
    let mock = Server::mock_upstream().await;
    let relay_dsn = format!("{} user=pgq_log_relay dbname=pgq_engine_log", cluster_dsn());
    let relay = Server::relay(&relay_dsn, &format!("{}/v1", mock.url), &[]).await;

    let logged_before = server_log().len();
    let http = reqwest::Client::new();
    let wrong_key = format!("{}0", &key.secret[..key.secret.len() - 1]);
    for (i, secret) in [&key.secret, &key.secret, &key.secret, &wrong_key].iter().enumerate() {
        let resp = http
            .post(format!("{}/v1/chat/completions", relay.url))
            .bearer_auth(secret)
            .json(&serde_json::json!({"model": "gpt-4o", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": format!("hello {i}")}]}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(status, if i < 3 { 200 } else { 401 }, "request {i}: {}", resp.text().await.unwrap());
    }
    eventually("three settled requests", Duration::from_secs(10), || async {
        db.query_one("SELECT count(*) FROM quota.usage_ledger", &[]).await.unwrap().get::<_, i64>(0) == 3
    })
    .await;

    let log = String::from_utf8_lossy(&server_log()[logged_before..]).into_owned();
    assert!(
        log.contains("quota.admit(") && log.contains("quota.settle("),
        "log_statement = 'all' logs the relay's statements"
    );
    let secret = key.secret.rsplit('-').next().unwrap();
    for (what, s) in [("the key's secret", secret), ("the wrong key's secret", wrong_key.rsplit('-').next().unwrap())] {
        assert!(!log.contains(s), "{what} is in the server log:\n{log}");
    }
    assert_no_drift(&db).await;
}

/// Runs `sql/examples/relay_role.sql` with psql, as the README says, for the role `name`.
async fn relay_role(dsn: &str, name: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/examples/relay_role.sql");
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", &format!("relay_role={name}"), "-f", script, dsn])
        .output()
        .await
        .expect("run psql");
    assert!(out.status.success(), "relay_role.sql failed: {}", String::from_utf8_lossy(&out.stderr));
}
