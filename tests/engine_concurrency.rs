//! Concurrency against a running server: many connections racing on one key must never
//! overshoot a strict limit, never let first requests bypass it, never settle or refund twice,
//! and always leave counters equal to the ledger.
use pg_quota_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_postgres::Client;

const CONNECTIONS: usize = 32;

async fn clients(dsn: &str, n: usize) -> Vec<Client> {
    futures::future::join_all((0..n).map(|_| connect(dsn))).await
}

/// Each worker loops admit → settle (or refund every 5th) until `rounds` requests are done.
async fn hammer(dsn: &str, key: &str, model: &str, rounds: usize, actual_out: i64) -> (usize, usize) {
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (w, db) in clients(dsn, CONNECTIONS).await.into_iter().enumerate() {
        let (key, model) = (key.to_string(), model.to_string());
        let (admitted, refused) = (admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..rounds {
                let rid = format!("{model}-{w}-{i}");
                let row = db
                    .query_one(
                        "SELECT allowed FROM quota.admit($1, $2, $3, 100, 100)",
                        &[&key, &rid, &model],
                    )
                    .await
                    .unwrap();
                if !row.get::<_, bool>(0) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                admitted.fetch_add(1, Ordering::Relaxed);
                if i % 5 == 4 {
                    db.query_one("SELECT quota.refund($1, 'upstream failed')", &[&rid]).await.unwrap();
                } else {
                    db.query_one("SELECT * FROM quota.settle($1, 100, $2)", &[&rid, &actual_out])
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (admitted.load(Ordering::Relaxed), refused.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_cost_limit_holds_under_32_connections() {
    let dsn = fresh_database("pgq_conc_strict").await;
    let db = connect(&dsn).await;
    // 100 in + 100 out tokens cost $0.0003 at these prices; the limit allows ~33 of them.
    db.batch_execute("INSERT INTO quota.model_price VALUES ('m', 1, 2, NULL)").await.unwrap();
    let key = key_with_policy(&db, "strict", "'cost', 'day', 0.01, 'strict'").await.secret;

    let (admitted, refused) = hammer(&dsn, &key, "m", 10, 100).await;
    assert!(refused > 0, "the limit must have been reached ({admitted} admitted)");

    // Compared in SQL: money stays NUMERIC end to end.
    let row = db
        .query_one(
            "SELECT sum(cost) <= 0.01, sum(cost) >= 0.0093, sum(cost)::text, \
                    (SELECT sum(reserved) = 0 FROM quota.counter) FROM quota.usage_ledger",
            &[],
        )
        .await
        .unwrap();
    let spent: String = row.get(2);
    assert!(row.get::<_, bool>(0), "strict limit overshot: spent {spent} of 0.01");
    assert!(row.get::<_, bool>(1), "strict limit should be nearly used up, spent {spent}");
    assert!(row.get::<_, bool>(3), "no reservation may dangle");
    assert_no_drift(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_overshoot_is_bounded_by_requests_in_flight() {
    let dsn = fresh_database("pgq_conc_graceful").await;
    let db = connect(&dsn).await;
    let key = key_with_policy(&db, "graceful", "'tokens', 'day', 5000, 'graceful'").await.secret;

    // Each settled request uses 100 + 150 tokens.
    let (_, refused) = hammer(&dsn, &key, "m", 10, 150).await;
    assert!(refused > 0);
    let used: i64 = db
        .query_one("SELECT sum(input_tokens + output_tokens)::bigint FROM quota.usage_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert!(used >= 5000, "graceful lets the window be used up, used {used}");
    // Past the limit only requests already admitted before it was reached may finish.
    assert!(
        used < 5000 + (CONNECTIONS as i64) * 250,
        "overshoot beyond the requests in flight: used {used}"
    );
    assert_no_drift(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_requests_of_a_new_subject_cannot_bypass_the_limit() {
    let dsn = fresh_database("pgq_conc_first").await;
    let db = connect(&dsn).await;
    let key = key_with_policy(&db, "first", "'requests', 'day', 5, 'strict'").await.secret;
    // No counter row exists yet: 32 connections race to create it.
    let conns = clients(&dsn, CONNECTIONS).await;
    let results = futures::future::join_all(conns.iter().enumerate().map(|(i, c)| {
        let key = key.clone();
        async move {
            c.query_one("SELECT allowed FROM quota.admit($1, $2, 'm', 1, 1)", &[&key, &format!("f{i}")])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|a| **a).count(), 5);
    assert_no_drift(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_settles_and_refunds_take_effect_once() {
    let dsn = fresh_database("pgq_conc_once").await;
    let db = connect(&dsn).await;
    db.batch_execute("INSERT INTO quota.model_price VALUES ('m', 1, 2, NULL)").await.unwrap();
    let key = key_with_policy(&db, "once", "'cost', 'day', 100, 'strict'").await.secret;
    for rid in ["settle-me", "refund-me"] {
        db.query_one("SELECT allowed FROM quota.admit($1, $2, 'm', 1000, 1000)", &[&key, &rid])
            .await
            .unwrap();
    }
    let conns = clients(&dsn, 8).await;
    let settles = futures::future::join_all(conns.iter().map(|c| async move {
        let r = c
            .query_one("SELECT cost::text, replay FROM quota.settle('settle-me', 1000, 500)", &[])
            .await
            .unwrap();
        (r.get::<_, String>(0), r.get::<_, bool>(1))
    }))
    .await;
    assert!(settles.iter().all(|(cost, _)| cost == "0.002"), "{settles:?}");
    assert_eq!(settles.iter().filter(|(_, replay)| !replay).count(), 1, "{settles:?}");

    let refunds = futures::future::join_all(conns.iter().map(|c| async move {
        c.query_one("SELECT quota.refund('refund-me')", &[]).await.unwrap().get::<_, bool>(0)
    }))
    .await;
    assert_eq!(refunds.iter().filter(|r| **r).count(), 1, "{refunds:?}");

    let ledger: i64 = db.query_one("SELECT count(*) FROM quota.usage_ledger", &[]).await.unwrap().get(0);
    assert_eq!(ledger, 1);
    assert_no_drift(&db).await;
}
