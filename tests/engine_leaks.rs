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
    // the secret with its last (hex) digit changed: a key of the right shape that is not it
    let last = if key.secret.ends_with('0') { '1' } else { '0' };
    let wrong_key = format!("{}{last}", &key.secret[..key.secret.len() - 1]);
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

/// The first requests of the day for a model without a price, from many connections at once:
/// exactly one `unpriced_model` event (the day's marker row decides), every request admitted
/// and settled unbilled, and the next day logs it again.
#[tokio::test]
async fn concurrent_first_requests_of_an_unpriced_model_log_it_once() {
    let dsn = fresh_database("pgq_engine_unpriced").await;
    let db = connect(&dsn).await;
    let key = key_with_policy(&db, "unpriced", "'requests', 'day', 1000, 'strict'").await;
    let admits: Vec<_> = (0..16)
        .map(|i| {
            let (dsn, secret) = (dsn.clone(), key.secret.clone());
            tokio::spawn(async move {
                let c = connect(&dsn).await;
                c.batch_execute("SET pg_quota.fake_now = '2026-06-01 12:00:00+00'").await.unwrap();
                let id = format!("u{i}");
                let allowed: bool = c
                    .query_one("SELECT allowed FROM quota.admit($1, $2, 'local-llama', 10, 10)", &[&secret, &id])
                    .await
                    .unwrap()
                    .get(0);
                let billed: bool = c
                    .query_one("SELECT billed FROM quota.settle($1, 10, 10)", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                (allowed, billed)
            })
        })
        .collect();
    for a in admits {
        assert_eq!(a.await.unwrap(), (true, false), "admitted, settled unbilled");
    }
    let events = |day: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM quota.event WHERE kind = 'unpriced_model' AND detail ->> 'model' = 'local-llama' \
                 AND (at AT TIME ZONE 'UTC')::date = $1::text::date",
                &[&day],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(events("2026-06-01").await, 1);
    db.batch_execute("SET pg_quota.fake_now = '2026-06-02 00:00:01+00'").await.unwrap();
    db.query_one("SELECT allowed FROM quota.admit($1, 'next-day', 'local-llama', 10, 10)", &[&key.secret])
        .await
        .unwrap();
    assert_eq!(events("2026-06-02").await, 1);
    let unbilled: i64 = db
        .query_one("SELECT unbilled_requests FROM quota.status($1)", &[&key.key_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unbilled, 0, "a new day's window has no unbilled request yet");
    assert_no_drift(&db).await;
}
