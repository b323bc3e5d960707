//! Scopes under concurrency, against a running server: a channel cap is never overshot and a
//! request that finds its preferred channel full is routed to the next one instead of refused;
//! admits and settles of one user across a channel never deadlock; ledger = counters.
use pg_quota_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const CONNECTIONS: usize = 32;
const ROUNDS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_channel_overflows_to_the_next_one_without_overshoot_or_refusal() {
    let dsn = fresh_database("pgq_conc_channels").await;
    let db = connect(&dsn).await;
    db.batch_execute(
        "INSERT INTO quota.model_price VALUES ('m', 1, 2, NULL);
         INSERT INTO quota.channel (name, base_url, api_key, priority) VALUES
             ('free', 'http://free.invalid/v1', 'sk-free', 10),
             ('paid', 'http://paid.invalid/v1', 'sk-paid', 0);
         INSERT INTO quota.channel_model (channel_id, model) SELECT channel_id, 'm' FROM quota.channel;
         -- 5,000 raw tokens a day on the free channel, strict: 25 requests of 100 + 100.
         INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
         SELECT 'channel', channel_id, 'tokens', 'day', 5000 FROM quota.channel WHERE name = 'free';",
    )
    .await
    .unwrap();
    // One user: its own daily cost policy is locked by every admit and settle too, so the lock
    // order between channel and user counters is exercised.
    let key = key_with_policy(&db, "busy", "'cost', 'day', 1000, 'strict'").await.secret;

    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..CONNECTIONS {
        let (dsn, key, refused) = (dsn.clone(), key.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let db = connect(&dsn).await;
            for i in 0..ROUNDS {
                let rid = format!("c-{w}-{i}");
                let row = db
                    .query_one(
                        "SELECT allowed, error_code FROM quota.admit($1, $2, 'm', 100, 100)",
                        &[&key, &rid],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("admit {rid}: {e}"));
                if !row.get::<_, bool>(0) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let code: Option<String> = row.get(1);
                    panic!("{rid} refused with {code:?} although the paid channel has room");
                }
                db.query_one("SELECT * FROM quota.settle($1, 100, 100)", &[&rid])
                    .await
                    .unwrap_or_else(|e| panic!("settle {rid}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(refused.load(Ordering::Relaxed), 0);

    let row = db
        .query_one(
            "SELECT coalesce(sum(l.input_tokens + l.output_tokens) FILTER (WHERE c.name = 'free'), 0)::bigint,
                    count(*) FILTER (WHERE c.name = 'paid'),
                    count(*)
             FROM quota.usage_ledger l JOIN quota.channel c USING (channel_id)",
            &[],
        )
        .await
        .unwrap();
    let (free_tokens, paid_requests, all): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(all, (CONNECTIONS * ROUNDS) as i64, "every request is in the ledger with its channel");
    assert_eq!(free_tokens, 5000, "the free channel is filled exactly to its cap, never beyond");
    assert_eq!(paid_requests, (CONNECTIONS * ROUNDS) as i64 - 25, "the overflow went to the paid channel");
    let left: i64 = db.query_one("SELECT count(*) FROM quota.reservation", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "no reservation may dangle");
    assert_no_drift(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_members_race_on_their_own_counters_and_merged_limits_hold() {
    let dsn = fresh_database("pgq_conc_groups").await;
    let db = connect(&dsn).await;
    db.batch_execute("INSERT INTO quota.model_price VALUES ('m', 1, 2, NULL)").await.unwrap();
    // Two members of one group with 10 requests a day each (per member, not shared); the second
    // member also has a personal 15 a day, which merges with the group's by MAX.
    let a = key_with_policy(&db, "member-a", "'requests', 'day', 1, 'strict'").await;
    let b = key_with_policy(&db, "member-b", "'requests', 'day', 15, 'strict'").await;
    db.batch_execute(&format!(
        "DELETE FROM quota.policy WHERE subject_id = {a} AND subject_type = 'user';
         INSERT INTO quota.user_group (name) VALUES ('team');
         INSERT INTO quota.user_group_member SELECT group_id, u FROM quota.user_group, unnest(ARRAY[{a}, {b}]::bigint[]) u;
         INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
         SELECT 'user_group', group_id, 'requests', 'day', 10 FROM quota.user_group;",
        a = a.user_id,
        b = b.user_id
    ))
    .await
    .unwrap();

    let mut tasks = Vec::new();
    for w in 0..CONNECTIONS {
        let dsn = dsn.clone();
        let key = if w % 2 == 0 { a.secret.clone() } else { b.secret.clone() };
        tasks.push(tokio::spawn(async move {
            let db = connect(&dsn).await;
            for i in 0..3 {
                let rid = format!("g-{w}-{i}");
                let allowed: bool = db
                    .query_one("SELECT allowed FROM quota.admit($1, $2, 'm', 1, 1)", &[&key, &rid])
                    .await
                    .unwrap()
                    .get(0);
                if allowed {
                    db.query_one("SELECT * FROM quota.settle($1, 1, 1)", &[&rid]).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_user = db
        .query("SELECT user_id, count(*) FROM quota.usage_ledger GROUP BY 1 ORDER BY 1", &[])
        .await
        .unwrap();
    let count = |uid: i64| per_user.iter().find(|r| r.get::<_, i64>(0) == uid).map_or(0, |r| r.get::<_, i64>(1));
    assert_eq!(count(a.user_id), 10, "member a gets the group's full 10, on its own");
    assert_eq!(count(b.user_id), 15, "member b gets MAX(15 personal, 10 group)");
    assert_no_drift(&db).await;
}
