//! The background worker (library in shared_preload_libraries; the harness sets
//! pg_quota.sweep_database = pgq_sweeper and pg_quota.sweep_interval = 1s) charges a crashed
//! relay's reservation without anyone calling quota.sweep(), says so in the server log, and
//! comes back when it is terminated while the server runs. On a standby it waits, quietly,
//! until a promotion makes the server a primary, and then sweeps without a restart. After each
//! sweep it keeps the ledger's partitions (quota.maintain_ledger).
use pg_quota_tests::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn background_worker_charges_stale_reservations_by_itself() {
    let (db, key) = an_hour_ago().await;
    let logged_before = server_log().len();
    // A relay admitted this an hour ago and then died: nobody will settle or refund it.
    let allowed: bool = db
        .query_one("SELECT allowed FROM quota.admit($1, 'orphan', 'm', 1, 1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(allowed);

    wait_expired(&db, "orphan").await;
    // Charged at its reservation (pg_quota.expired_reservations = 'charge', the default): the
    // hold became usage, like a settle of the estimate.
    let (used, reserved): (String, String) = db
        .query_one("SELECT used::text, reserved::text FROM quota.counter", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((used.as_str(), reserved.as_str()), ("1", "0"), "the hold is charged, not given back");
    let logged: i64 = db
        .query_one("SELECT count(*) FROM quota.event WHERE kind = 'reservation_expired'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
    assert_no_drift(&db).await;
    // The operator reads what the sweep did in the server log, every count of it.
    let line = "pg_quota sweep: 1 stale reservations expired (charged at their reservation), 0 keys resumed, \
                0 spent windows recovered; pruned 0 rolling buckets, 0 records of released reservations \
                and 0 events";
    eventually("the sweep's line in the server log", Duration::from_secs(5), || async {
        String::from_utf8_lossy(&server_log()[logged_before..]).contains(line)
    })
    .await;
}

/// A fresh sweeper database with a key under a policy, and a session whose clock reads an
/// hour ago: what it admits is a stale reservation at once.
async fn an_hour_ago() -> (tokio_postgres::Client, String) {
    an_hour_ago_at(&cluster_dsn()).await
}

/// `an_hour_ago` on the cluster of `maintenance_dsn`.
async fn an_hour_ago_at(maintenance_dsn: &str) -> (tokio_postgres::Client, String) {
    let db = connect(&fresh_database_at(maintenance_dsn, "pgq_sweeper").await).await;
    let uid: i64 = db.query_one("SELECT quota.create_user('crashy')", &[]).await.unwrap().get(0);
    let key: String = db.query_one("SELECT quota.create_key($1, 'k')", &[&uid]).await.unwrap().get(0);
    db.batch_execute(&format!(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) \
         VALUES ('user', {uid}, 'requests', 'day', 10)"
    ))
    .await
    .unwrap();
    db.query_one("SELECT set_config('pg_quota.fake_now', (now() - interval '1 hour')::text, false)", &[])
        .await
        .unwrap();
    (db, key)
}

/// Waits (up to 30 s) for the sweeper to charge `request_id` as expired (its ledger row).
async fn wait_expired(db: &tokio_postgres::Client, request_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .query_opt("SELECT settled_by FROM quota.usage_ledger WHERE request_id = $1", &[&request_id])
            .await
            .unwrap();
        if let Some(row) = row {
            assert_eq!(row.get::<_, String>(0), "sweep");
            return;
        }
        assert!(Instant::now() < deadline, "the sweeper did not charge {request_id} within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The worker keeps the ledger's partitions by itself: a week of day partitions ahead, and a
/// row that found none (here, settled a month ahead, as after a month without upkeep) filed
/// into a partition of its own day, with a WARNING in the server log.
#[tokio::test]
async fn background_worker_keeps_the_ledger_partitioned() {
    let (db, key) = an_hour_ago().await;
    eventually("a week of ledger partitions ahead", Duration::from_secs(30), || async {
        let ahead: i64 = db
            .query_one(
                "SELECT count(*) FROM quota.ledger_partitions() \
                 WHERE NOT is_default AND range_to > now() + interval '7 days'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        ahead > 0
    })
    .await;
    let logged_before = server_log().len();
    db.query_one("SELECT set_config('pg_quota.fake_now', (now() + interval '30 days')::text, false)", &[])
        .await
        .unwrap();
    let settled: bool = db
        .query_one(
            "SELECT s.settled FROM quota.admit($1, 'late', 'm', 1, 1) a, LATERAL quota.settle('late', 1, 1) s",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert!(settled);
    eventually("the stray row filed into a partition", Duration::from_secs(30), || async {
        let partition: String = db
            .query_one("SELECT tableoid::regclass::text FROM quota.usage_ledger WHERE request_id = 'late'", &[])
            .await
            .unwrap()
            .get(0);
        partition != "quota.usage_ledger_default"
    })
    .await;
    eventually("the upkeep's warning in the server log", Duration::from_secs(5), || async {
        String::from_utf8_lossy(&server_log()[logged_before..])
            .contains("ledger rows that no partition took, filed into partitions now: 1")
    })
    .await;
    assert_no_drift(&db).await;
}

#[tokio::test]
async fn background_worker_comes_back_after_being_terminated() {
    let (db, key) = an_hour_ago().await;
    // The worker serves this database (it may first have to come back from the DROP DATABASE
    // of fresh_database, which terminated it).
    db.query_one("SELECT allowed FROM quota.admit($1, 'first', 'm', 1, 1)", &[&key]).await.unwrap();
    wait_expired(&db, "first").await;

    // An operator terminates it: it is started again (after its 10 s restart time) and sweeps.
    let terminated: i64 = db
        .query_one(
            "WITH w AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_quota sweeper') \
             SELECT count(*) FROM w WHERE pg_terminate_backend(w.pid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1, "one sweeper was running");
    db.query_one("SELECT allowed FROM quota.admit($1, 'second', 'm', 1, 1)", &[&key]).await.unwrap();
    wait_expired(&db, "second").await;
}

#[tokio::test]
async fn on_a_standby_the_worker_waits_for_promotion_then_sweeps() {
    // A primary whose own worker does not sweep (interval 0), so that the stale reservation
    // is left for its standby; the standby sweeps every second.
    let sweeper = "shared_preload_libraries = 'pg_quota'\npg_quota.sweep_database = 'pgq_sweeper'";
    let primary = PrivateCluster::start_with("ha-primary", &format!("{sweeper}\npg_quota.sweep_interval = 0")).await;
    let (db, key) = an_hour_ago_at(&primary.dsn()).await;
    let standby = PrivateCluster::standby_of(&primary, "ha-standby", "pg_quota.sweep_interval = 1").await;
    // A relay admitted this on the primary an hour ago and died; the standby has it too.
    db.query_one("SELECT allowed FROM quota.admit($1, 'orphan', 'm', 1, 1)", &[&key]).await.unwrap();
    let on_standby = connect(&format!("{} dbname=pgq_sweeper", standby.dsn())).await;
    let replica = &on_standby;
    eventually("the standby replays the reservation", Duration::from_secs(30), || async move {
        replica
            .query_one("SELECT count(*) FROM quota.reservation WHERE request_id = 'orphan'", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;

    // In recovery, for several sweep intervals: no sweep, and nothing in the log about one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = standby.server_log();
    assert!(!log.contains("ERROR"), "the standby's log has errors:\n{log}");
    assert!(!log.contains("pg_quota sweep"), "the worker ran on the standby:\n{log}");
    let held: i64 = on_standby
        .query_one("SELECT count(*) FROM quota.reservation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1, "the reservation waits for the new primary");

    // The primary dies and the standby is promoted: it sweeps, without a restart.
    primary.kill().await;
    standby.promote().await;
    wait_expired(&on_standby, "orphan").await;
    let (used, reserved): (String, String) = on_standby
        .query_one("SELECT used::text, reserved::text FROM quota.counter", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((used.as_str(), reserved.as_str()), ("1", "0"), "the hold is charged on the new primary");
    assert_no_drift(&on_standby).await;
    let log = standby.server_log();
    assert!(log.contains("pg_quota sweep: 1 stale reservations expired"), "{log}");
    assert!(!log.contains("ERROR"), "the new primary's log has errors:\n{log}");
}
