//! The relay end to end, the database and the relay's own process: outages, shutdown, the
//! pool and TLS to the database.
use pg_quota_tests::*;
use serde_json::json;
use std::time::Duration;

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
    let id = answered_while_the_database_stops(&r, &cluster, "2000").await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    cluster.start_again().await;
    charged_9_output_tokens(&dsn, &id).await;
    drop(r); // relay and mock go before the cluster
}

/// Sends a request whose upstream works for `latency_ms` (and writes 9 tokens), stops the
/// database once the request reached the upstream, and returns the answer's request id.
async fn answered_while_the_database_stops(r: &Relayed, cluster: &PrivateCluster, latency_ms: &str) -> String {
    let mock = [("x-mock-latency-ms", latency_ms), ("x-mock-output-tokens", "9")];
    let pending = tokio::spawn(r.chat(chat_body(100), &mock).send());
    let forwarded = || async { mock_requests(&r.mock).await.len() == 1 };
    eventually("the request reached the upstream", Duration::from_secs(5), forwarded).await;
    cluster.stop().await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the answer does not wait for its settlement");
    request_id(&resp)
}

/// Waits (20 s at most) for the ledger row of `id` in the database of `dsn`; it must charge
/// 9 output tokens, leave no reservation and no drift.
async fn charged_9_output_tokens(dsn: &str, id: &str) {
    let db = connect(dsn).await;
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
}

#[tokio::test]
async fn a_moderate_load_runs_on_the_connections_used_last() {
    let dsn = fresh_database("pgq_e2e_lifo").await;
    // the pool's order, not batching, is under test: every call on a connection of its own
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &["--batch-max", "1"]).await;
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

/// Sends SIGTERM to a relay and waits for it to exit; panics unless it exits within `within`.
async fn terminate(relay: &mut Server, within: Duration) {
    let pid = relay.child.id().expect("the relay runs").to_string();
    let kill = tokio::process::Command::new("kill").args(["-TERM", &pid]).status();
    assert!(kill.await.unwrap().success());
    let exit = tokio::time::timeout(within, relay.child.wait()).await;
    exit.expect("the relay exits after SIGTERM").unwrap();
}

#[tokio::test]
async fn fail_open_serves_only_keys_seen_recently_and_within_a_budget() {
    let cluster = PrivateCluster::start("e2e-fail-open").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_fail_open").await;
    let budget = ["--fail-open", "--fail-open-max-requests", "2"];
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &budget).await;
    // A second key that exists but has not been used through this relay.
    let other = key_with_policy(&r.db, "bob", "'tokens', 'day', 1000000, 'strict'").await;
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;

    cluster.stop().await;
    // Unseen keys, and strings that are no key, are refused as with fail-closed.
    let forged = format!("sk-pgq-{}-{}", "0".repeat(12), "0".repeat(64));
    for secret in [other.secret.as_str(), forged.as_str()] {
        let resp = r
            .http
            .post(format!("{}/v1/chat/completions", r.relay.url))
            .bearer_auth(secret)
            .json(&chat_body(10))
            .send()
            .await
            .unwrap();
        openai_error(resp, 503, "server_error", "quota_database_unavailable").await;
    }
    // The key admitted a moment ago passes, unaccounted and saying so, within the budget ...
    for _ in 0..2 {
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-pgq-accounting"], "off");
    }
    // ... and then the relay fails closed for the rest of the outage.
    let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
    openai_error(resp, 503, "server_error", "quota_database_unavailable").await;
    assert_eq!(mock_requests(&r.mock).await.len(), 3, "only the known key was forwarded");
    let metrics = r.http.get(format!("{}/metrics", r.relay.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"outcome="fail_open"} 2"#), "{metrics}");

    // The database is back: accounting again.
    cluster.start_again().await;
    eventually("requests are accounted again", Duration::from_secs(20), || async {
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        resp.status() == 200 && resp.headers().get("x-pgq-accounting").is_none()
    })
    .await;
    drop(r);
}

#[tokio::test]
async fn settlements_pending_at_shutdown_are_replayed_at_the_next_start() {
    let cluster = PrivateCluster::start("e2e-journal").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_journal").await;
    let state_dir = std::env::temp_dir().join(format!("pgq-e2e-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let args = ["--shutdown-grace-s", "1", "--state-dir", state_dir.to_str().unwrap()];
    let mut r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &args).await;
    // Admitted, then the database stops while the upstream works.
    let id = answered_while_the_database_stops(&r, &cluster, "1500").await;
    // The relay stops while its settlement still waits for the database ...
    terminate(&mut r.relay, Duration::from_secs(10)).await;
    assert!(state_dir.join("settlements.journal").exists(), "the journal was written");
    // ... and both come back.
    cluster.start_again().await;
    r.relay = Server::relay(&dsn, &format!("{}/v1", r.mock.url), &args).await;
    charged_9_output_tokens(&dsn, &id).await;
    drop(r);
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test]
async fn settlements_that_hit_lock_or_statement_timeouts_are_retried() {
    for (n, setting) in ["lock_timeout", "statement_timeout"].into_iter().enumerate() {
        let dsn = fresh_database(&format!("pgq_e2e_settle_timeout{n}")).await;
        let relay_dsn = format!("{dsn} options='-c {setting}=200ms'");
        let db = connect(&dsn).await;
        db.batch_execute(
            "INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-4o', 2.50, 10.00)",
        )
        .await
        .unwrap();
        let key = key_with_policy(&db, "alice", "'tokens', 'day', 1000000, 'strict'").await;
        let mock = Server::mock_upstream().await;
        let relay = Server::relay(&relay_dsn, &format!("{}/v1", mock.url), &[]).await;
        let http = reqwest::Client::new();
        let r = Relayed { dsn: dsn.clone(), db, key, mock, relay, http };
        let pending = tokio::spawn(r.chat(chat_body(100), &[("x-mock-latency-ms", "1000")]).send());
        let forwarded = || async { mock_requests(&r.mock).await.len() == 1 };
        eventually("the request reached the upstream", Duration::from_secs(5), forwarded).await;
        // Another transaction holds the key's counters while the settlement comes.
        let locker = connect(&dsn).await;
        locker.batch_execute("BEGIN; SELECT 1 FROM quota.counter FOR UPDATE").await.unwrap();
        let resp = pending.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        let id = request_id(&resp);
        tokio::time::sleep(Duration::from_secs(2)).await;
        locker.batch_execute("COMMIT").await.unwrap();
        let (_, output, _, billed, _) = r.ledger_row(&id).await;
        assert_eq!((output, billed), (16, true), "{setting}");
        assert_eq!(r.reservations().await, 0);
        assert_no_drift(&r.db).await;
    }
}

#[tokio::test]
async fn a_saturated_pool_is_busy_not_an_outage_even_with_fail_open() {
    let r = relayed(
        "pgq_e2e_busy",
        "'tokens', 'day', 1000000, 'strict'",
        &["--fail-open", "--pool-size", "1"],
    )
    .await;
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;
    // The only connection waits at admit for a lock another transaction holds ...
    let locker = connect(&r.dsn).await;
    locker.batch_execute("BEGIN; SELECT 1 FROM quota.counter FOR UPDATE").await.unwrap();
    let first = tokio::spawn(r.chat(chat_body(10), &[]).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... so the next request waits for the pool, and is told the database is busy: it is
    // there, so nothing is forwarded without accounting.
    let forged = format!("sk-pgq-{}-{}", "0".repeat(12), "0".repeat(64));
    let resp = r
        .http
        .post(format!("{}/v1/chat/completions", r.relay.url))
        .bearer_auth(&forged)
        .json(&chat_body(10))
        .send()
        .await
        .unwrap();
    openai_error(resp, 503, "server_error", "database_busy").await;
    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    r.wait_ledger_rows(2).await;
    assert_eq!(mock_requests(&r.mock).await.len(), 2, "nothing was forwarded unaccounted");
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn an_admit_whose_connection_is_lost_is_run_again_and_the_request_passes() {
    let r = relayed("pgq_e2e_admit_lost", "'tokens', 'day', 1000000, 'strict'", &[]).await;
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;

    // Another session holds the key's counter, so the next admit is sent and waits unanswered.
    let holder = connect(&r.dsn).await;
    holder.batch_execute("BEGIN; SELECT * FROM quota.counter FOR UPDATE").await.unwrap();
    let pending = tokio::spawn(r.chat(chat_body(10), &[]).send());
    let waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-quota-relay' \
                   AND wait_event_type = 'Lock'";
    let waiting_pid = || async { r.db.query_opt(waiting, &[]).await.unwrap().map(|row| row.get::<_, i32>(0)) };
    eventually("the admit waits on the counter", Duration::from_secs(10), || async {
        waiting_pid().await.is_some()
    })
    .await;
    let first = waiting_pid().await.unwrap();
    // Its connection is lost mid-call: the relay cannot know whether the admit committed.
    r.db.execute("SELECT pg_terminate_backend($1)", &[&first]).await.unwrap();
    // It runs the admit again, with the same request id, on another connection...
    eventually("the admit is run again", Duration::from_secs(10), || async {
        waiting_pid().await.is_some_and(|pid| pid != first)
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    // ...which is admitted: the client never sees the lost connection.
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    r.wait_ledger_rows(2).await;
    assert_eq!(r.reservations().await, 0);
    assert_eq!(mock_requests(&r.mock).await.len(), 2, "each request forwarded once");
    assert_no_drift(&r.db).await;
}

#[tokio::test]
async fn an_admit_that_committed_unanswered_is_refunded_once_the_database_is_back() {
    let cluster = PrivateCluster::start("e2e-admit-unknown").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_admit_unknown").await;
    let r = relayed_on(&dsn, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;

    // Commits wait for a synchronous standby that never comes: the next admit is flushed to
    // the server's WAL and then waits for an acknowledgement, unanswered.
    let admin = connect(&cluster.dsn()).await;
    admin.batch_execute("CREATE TABLE probe (x int)").await.unwrap();
    for sql in ["ALTER SYSTEM SET synchronous_standby_names = 'nobody'", "SELECT pg_reload_conf()"] {
        admin.batch_execute(sql).await.unwrap();
    }
    // The reload reaches the server's processes in their own time: until a commit waits, an
    // admit would commit at once and the request pass (then its settle waits instead). A probe
    // write whose commit still waits after 200 ms shows the requirement holds (the probes left
    // waiting die with the server).
    eventually("commits wait for the standby", Duration::from_secs(10), || async {
        let probe = connect(&cluster.dsn()).await;
        let commit = probe.batch_execute("INSERT INTO probe VALUES (1)");
        tokio::time::timeout(Duration::from_millis(200), commit).await.is_err()
    })
    .await;
    let pending = tokio::spawn(r.chat(chat_body(10), &[]).send());
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-quota-relay' \
                   AND wait_event = 'SyncRep'";
    eventually("the admit waits for the standby", Duration::from_secs(10), || async {
        admin.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    // The server dies before it answers (it comes back without the standby requirement), and
    // the relay's attempts run out while it is away: the client is refused ...
    admin.batch_execute("ALTER SYSTEM RESET synchronous_standby_names").await.unwrap();
    cluster.kill().await;
    let resp = pending.await.unwrap().unwrap();
    let id = request_id(&resp);
    openai_error(resp, 503, "server_error", "quota_database_unavailable").await;
    assert_eq!(mock_requests(&r.mock).await.len(), 1, "the refused request was not forwarded");

    // ... but its admit had committed: once the server is back, the relay refunds the
    // reservation, so the sweep never charges a request the client saw refused.
    cluster.start_again().await;
    let db = connect(&dsn).await;
    let refunded = "SELECT count(*) FROM quota.released WHERE request_id = $1 AND kind = 'refunded' \
                    AND reason = 'admit_outcome_unknown'";
    eventually("the reservation is refunded", Duration::from_secs(20), || async {
        db.query_one(refunded, &[&id]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    let (reservations, charged): (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM quota.reservation), \
                    (SELECT count(*) FROM quota.usage_ledger WHERE request_id = $1)",
            &[&id],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!((reservations, charged), (0, 0), "nothing held, nothing charged");
    assert_no_drift(&db).await;
    let metrics = r.http.get(format!("{}/metrics", r.relay.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"pgq_relay_settle_seconds_count{call="refund_if_admitted"}"#), "{metrics}");
    drop(r); // relay and mock go before the cluster
}

#[tokio::test]
async fn the_relay_follows_the_primary_through_a_failover_without_a_restart() {
    let primary = PrivateCluster::start("fo-primary").await;
    let dsn = fresh_database_at(&primary.dsn(), "pgq_e2e_failover").await;
    let standby = PrivateCluster::standby_of(&primary, "fo-standby", "").await;
    // Both hosts, the standby first: the relay connects only to the one that accepts writes.
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=pgq_e2e_failover target_session_attrs=read-write",
        standby.port, primary.port
    );
    let r = relayed_on_url(&dsn, &url, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    let healthz = || async {
        let resp = r.http.get(format!("{}/healthz", r.relay.url)).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;
    let (status, body) = healthz().await;
    assert_eq!(status, 200);
    assert_eq!(body["database_host"], format!("127.0.0.1:{}", primary.port), "{body}");
    let on_standby = connect(&format!("{} dbname=pgq_e2e_failover", standby.dsn())).await;
    let replica = &on_standby;
    eventually("the standby has the ledger row", Duration::from_secs(30), || async move {
        replica.query_one("SELECT count(*) FROM quota.usage_ledger", &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;

    // The primary dies; a failover manager promotes the standby.
    primary.kill().await;
    standby.promote().await;
    eventually("requests pass on the new primary", Duration::from_secs(30), || async {
        r.chat(chat_body(10), &[]).send().await.unwrap().status() == 200
    })
    .await;
    let (status, body) = healthz().await;
    assert_eq!(status, 200);
    assert_eq!(body["database_host"], format!("127.0.0.1:{}", standby.port), "{body}");
    eventually("every admitted request settled", SETTLE_WITHIN, || async move {
        replica.query_one("SELECT count(*) = 0 FROM quota.reservation", &[]).await.unwrap().get(0)
    })
    .await;
    let ledger: i64 = on_standby.query_one("SELECT count(*) FROM quota.usage_ledger", &[]).await.unwrap().get(0);
    assert_eq!(ledger, 2, "the request before the failover and the one after it");
    assert_no_drift(&on_standby).await;
    drop(r); // relay and mock go before the clusters
}

#[tokio::test]
async fn a_database_that_turns_read_only_answers_503_and_its_connections_are_dropped() {
    let cluster = PrivateCluster::start("e2e-readonly").await;
    let dsn = fresh_database_at(&cluster.dsn(), "pgq_e2e_readonly").await;
    let url = format!("{dsn} target_session_attrs=read-write");
    let r = relayed_on_url(&dsn, &url, "'tokens', 'day', 1000000, 'strict'", &[]).await;
    assert_eq!(r.chat(chat_body(10), &[]).send().await.unwrap().status(), 200);
    r.wait_ledger_rows(1).await;

    // The server stays up but takes no writes any more (as a demoted primary would).
    let admin = connect(&cluster.dsn()).await;
    let read_only = |on: bool| {
        let admin = &admin;
        async move {
            // one statement each: ALTER SYSTEM cannot run in a batch's transaction
            for sql in [
                "SET default_transaction_read_only = off".to_string(),
                format!("ALTER SYSTEM SET default_transaction_read_only = {on}"),
                "SELECT pg_reload_conf()".to_string(),
            ] {
                admin.batch_execute(&sql).await.unwrap();
            }
        }
    };
    read_only(true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
    openai_error(resp, 503, "server_error", "quota_database_unavailable").await;
    // The relay keeps no connection to it: a new one would be refused (target_session_attrs).
    let relay_connections = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-quota-relay'";
    eventually("the relay's connections are dropped", Duration::from_secs(10), || async {
        admin.query_one(relay_connections, &[]).await.unwrap().get::<_, i64>(0) == 0
    })
    .await;

    read_only(false).await;
    eventually("requests pass once it takes writes again", Duration::from_secs(20), || async {
        r.chat(chat_body(10), &[]).send().await.unwrap().status() == 200
    })
    .await;
    r.wait_ledger_rows(2).await;
    assert_eq!(r.reservations().await, 0);
    assert_no_drift(&r.db).await;
    drop(r); // relay and mock go before the cluster
}
