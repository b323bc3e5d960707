//! A failover under streamed load: a primary with a synchronous standby made by
//! `pg_basebackup`, the relay given both hosts (`target_session_attrs=read-write`), clients
//! streaming chat completions through it; the primary is killed (immediate stop) and, once the
//! relay has answered 503 (a failover manager takes a while to act), the standby is promoted.
//! As in a crash, every 200 a client saw is charged exactly once on the new primary, a request
//! refused with 503 is charged nothing, the counters match the ledger, and no reservation is
//! left for the sweep, which runs on the promoted server. Prints how long the relay answered
//! 503, and how long after the promotion.
use pg_quota_tests::*;
use serde_json::json;
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clients streaming at once.
const CLIENTS: usize = 8;
/// 200s the clients must have seen before the primary dies, and after the promotion.
const ANSWERED: usize = 40;

/// What one client saw of one request.
struct Answer {
    at: Instant,
    request_id: String,
    status: u16,
    /// a 200 whose stream ended with `[DONE]`; a refusal with the relay's 503 error shape
    whole: bool,
}

#[tokio::test]
async fn a_failover_to_a_synchronous_standby_under_streamed_load_charges_each_answer_once() {
    let sweeper = "shared_preload_libraries = 'pg_quota'\npg_quota.sweep_database = 'pgq_failover'\n\
                   pg_quota.sweep_interval = 1";
    let primary = PrivateCluster::start_with("sync-primary", sweeper).await;
    let dsn = fresh_database_at(&primary.dsn(), "pgq_failover").await;
    let standby = PrivateCluster::standby_of(&primary, "sync-standby", "").await;
    // Synchronous from now on (the standby's own configuration, copied before, has no standby
    // to wait for once it is promoted): a commit returns once the standby has flushed it.
    let admin = connect(&primary.dsn()).await;
    for sql in ["ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()"] {
        admin.batch_execute(sql).await.unwrap();
    }
    eventually("the standby is synchronous", Duration::from_secs(30), || async {
        let sql = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'";
        admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=pgq_failover target_session_attrs=read-write",
        primary.port, standby.port
    );
    let r = Arc::new(relayed_on_url(&dsn, &url, "'tokens', 'day', 1000000000, 'strict'", &[]).await);

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(stream_until(r.clone(), stop.clone(), answers.clone())))
        .collect();
    let answered_since = |since: Instant| {
        let answers = answers.clone();
        move || {
            let n = answers.lock().unwrap().iter().filter(|a| a.status == 200 && a.at > since).count();
            async move { n >= ANSWERED }
        }
    };
    let started = Instant::now();
    eventually("answers before the failover", Duration::from_secs(30), answered_since(started)).await;

    // The primary dies; while no server takes writes the relay refuses (fail closed) ...
    let killed = Instant::now();
    primary.kill().await;
    eventually("503s while no server takes writes", Duration::from_secs(30), || {
        let refused = answers.lock().unwrap().iter().any(|a| a.status != 200);
        async move { refused }
    })
    .await;
    // ... until a failover manager promotes the standby.
    let promoting = Instant::now();
    standby.promote().await;
    let promoted = Instant::now();
    eventually("answers after the promotion", Duration::from_secs(30), answered_since(promoted)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap());

    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    for a in &refused {
        assert!(a.status == 503 && a.whole, "{} answered {} during the switch", a.request_id, a.status);
    }
    let partial: Vec<&str> = answers.iter().filter(|a| !a.whole).map(|a| a.request_id.as_str()).collect();
    assert!(partial.is_empty(), "streams cut short: {partial:?}");
    // straight to stderr, past the test harness's capture, so that scripts/test.sh shows it
    let (first, last) = (refused.first().unwrap(), refused.last().unwrap());
    let secs = |d: Duration| d.as_secs_f64();
    // negative when the relay answered 200s again before `pg_ctl promote` returned
    let last_after_promotion = if last.at >= promoted {
        secs(last.at - promoted)
    } else {
        -secs(promoted - last.at)
    };
    writeln!(
        std::io::stderr(),
        "failover: {} answers of 503 for {:.2} s, the last {:.2} s after the promotion ended \
         (the promotion took {:.2} s, from {:.2} s after the kill); {} answers of 200",
        refused.len(),
        secs(last.at - first.at),
        last_after_promotion,
        secs(promoted - promoting),
        secs(promoting - killed),
        answers.len() - refused.len(),
    )
    .unwrap();

    // On the new primary: the relay settles (or refunds) everything by itself ...
    let db = connect(&format!("{} dbname=pgq_failover", standby.dsn())).await;
    let db = &db;
    eventually("every reservation settled or refunded", Duration::from_secs(30), || async move {
        db.query_one("SELECT count(*) = 0 FROM quota.reservation", &[]).await.unwrap().get(0)
    })
    .await;
    // ... each 200 has exactly one ledger row, from its settle, and nothing else is charged.
    let charged: Vec<(String, String)> = db
        .query("SELECT request_id, settled_by FROM quota.usage_ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let ids: Vec<&str> = charged.iter().map(|(id, _)| id.as_str()).collect();
    let once: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(once.len(), ids.len(), "a request charged twice");
    let served: HashSet<&str> = answers.iter().filter(|a| a.status == 200).map(|a| a.request_id.as_str()).collect();
    assert_eq!(once, served, "the ledger's requests are the 200s the clients saw");
    assert!(charged.iter().all(|(_, by)| by == "settle"), "charged other than by settle: {charged:?}");
    assert_no_drift(db).await;
    // The sweeper runs on the promoted server, and finds nothing to charge.
    eventually("the sweeper runs on the new primary", Duration::from_secs(30), || async move {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_quota sweeper'";
        db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    drop(r); // relay and mock go before the clusters
}

/// One client: streamed chat completions one after another until `stop`, each answer recorded.
async fn stream_until(r: Arc<Relayed>, stop: Arc<AtomicBool>, answers: Arc<Mutex<Vec<Answer>>>) {
    // 10 output tokens 20 ms apart: each stream is in flight for about 200 ms
    let mock = [("x-mock-output-tokens", "10"), ("x-mock-chunk-delay-ms", "20")];
    while !stop.load(Ordering::Relaxed) {
        let mut body = chat_body(50);
        body["stream"] = json!(true);
        let resp = r.chat(body, &mock).send().await.expect("the relay answers");
        let (request_id, status) = (request_id(&resp), resp.status().as_u16());
        let whole = if status == 200 {
            let mut text = String::new();
            read_sse(&mut resp.bytes_stream(), &mut text, None).await;
            sse_data(&text).last().map(String::as_str) == Some("[DONE]")
        } else {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            body["error"]["code"].as_str().is_some_and(|c| c.starts_with("quota_database_") || c == "database_busy")
        };
        answers.lock().unwrap().push(Answer { at: Instant::now(), request_id, status, whole });
        if status != 200 {
            // a client backs off a little after a refusal
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
