//! The extension installs into a real cluster, the clock obeys `pg_quota.fake_now`, and the
//! relay's health check reports database reachability.
use pg_quota_tests::*;

#[tokio::test]
async fn extension_creates_schema_quota_and_fake_now_moves_the_clock() {
    let dsn = fresh_database("pgq_foundation").await;
    let db = connect(&dsn).await;

    let schema: String = db
        .query_one(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'pg_quota'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "quota");

    db.batch_execute("SET pg_quota.fake_now = '2030-01-01 00:00:00+00'").await.unwrap();
    let moved: bool = db
        .query_one("SELECT quota.clock() = '2030-01-01 00:00:00+00'::timestamptz", &[])
        .await
        .unwrap()
        .get(0);
    assert!(moved, "quota.clock() must read pg_quota.fake_now");
}

#[tokio::test]
async fn fake_now_is_refused_to_a_non_superuser_even_the_quota_admin() {
    let dsn = fresh_database("pgq_fake_now_priv").await;
    let db = connect(&dsn).await;
    // Even the quota admin role may not move the clock: only superusers can.
    db.batch_execute("DROP ROLE IF EXISTS pgq_plain; CREATE ROLE pgq_plain LOGIN IN ROLE quota_admin")
        .await
        .unwrap();
    let plain = connect(&format!("{dsn} user=pgq_plain")).await;
    // Load the library first so the GUC is defined (not a placeholder) in this session.
    plain.query_one("SELECT quota.clock()", &[]).await.unwrap();
    let err = plain
        .batch_execute("SET pg_quota.fake_now = '2030-01-01 00:00:00+00'")
        .await
        .expect_err("a plain role must not move the engine clock");
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(db_err.code(), &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE, "{db_err}");
    assert!(db_err.message().contains("permission denied"), "{db_err}");
}

#[tokio::test]
async fn relay_healthz_reports_the_database() {
    let dsn = fresh_database("pgq_healthz").await;
    let mock = Server::mock_upstream().await;
    let relay = Server::relay(&dsn, &format!("{}/v1", mock.url), &[]).await;

    let resp = reqwest::get(format!("{}/healthz", relay.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["database"], "ok");
}

#[tokio::test]
async fn relay_refuses_to_start_without_a_database() {
    let bin = std::env::var("PGQ_RELAY_BIN").unwrap();
    let out = tokio::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream-url", "http://127.0.0.1:9/v1"])
        .env("DATABASE_URL", "host=127.0.0.1 port=1 user=nobody password=hunter2 dbname=x")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "the relay must fail fast when the database is unreachable");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database"), "stderr should say the database is unreachable: {stderr}");
    assert!(!stderr.contains("hunter2"), "the password must never be printed: {stderr}");
}
