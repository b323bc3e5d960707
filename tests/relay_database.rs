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

