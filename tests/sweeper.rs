//! The background worker (library in shared_preload_libraries; the harness sets
//! pg_quota.sweep_database = pgq_sweeper and pg_quota.sweep_interval = 1s) releases a crashed
//! relay's reservation without anyone calling quota.sweep().
use pg_quota_tests::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn background_worker_releases_stale_reservations_by_itself() {
    let dsn = fresh_database("pgq_sweeper").await;
    let db = connect(&dsn).await;
    let uid: i64 = db.query_one("SELECT quota.create_user('crashy')", &[]).await.unwrap().get(0);
    let key: String = db.query_one("SELECT quota.create_key($1, 'k')", &[&uid]).await.unwrap().get(0);
    db.batch_execute(&format!(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) \
         VALUES ('user', {uid}, 'requests', 'day', 10)"
    ))
    .await
    .unwrap();
    // A relay admitted this an hour ago and then died: nobody will settle or refund it.
    db.query_one("SELECT set_config('pg_quota.fake_now', (now() - interval '1 hour')::text, false)", &[])
        .await
        .unwrap();
    let allowed: bool = db
        .query_one("SELECT allowed FROM quota.admit($1, 'orphan', 'm', 1, 1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(allowed);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .query_opt("SELECT kind FROM quota.released WHERE request_id = 'orphan'", &[])
            .await
            .unwrap();
        if let Some(row) = row {
            assert_eq!(row.get::<_, String>(0), "expired");
            break;
        }
        assert!(Instant::now() < deadline, "the sweeper did not release the reservation within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reserved: bool = db
        .query_one("SELECT reserved = 0 FROM quota.counter", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reserved, "the hold must be given back");
    let logged: i64 = db
        .query_one("SELECT count(*) FROM quota.event WHERE kind = 'reservation_expired'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
}
