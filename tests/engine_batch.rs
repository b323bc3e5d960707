//! Batched admission and settlement (`quota.admit_many`, `quota.settle_many`) on a running
//! server: a batch answers exactly as the same single calls made one by one in its order;
//! concurrent batches over the same counters in opposite orders neither deadlock nor overshoot;
//! a strict key relayed by 64 connections through a batching relay admits exactly its limit.
use pg_quota_tests::*;
use serde_json::json;
use tokio_postgres::Client;

/// The engine's clock, fixed, so that both databases answer with the same times.
const NOW: &str = "SET pg_quota.fake_now = '2026-06-01 12:00:00+00'";

/// Three users with a key each under a strict limit of 6 requests a day and a strict token
/// limit, all in one group whose graceful token limit has alert thresholds (who crosses a
/// threshold, or spends a limit, depends on the order of the items); the first user's requests
/// limit suspends its key when spent; the last key also has a strict rolling token limit.
/// Returns the keys' secrets.
async fn three_keys(db: &Client) -> Vec<String> {
    db.batch_execute("INSERT INTO quota.model_price VALUES ('m', 1, 2, NULL)")
        .await
        .unwrap();
    let mut secrets = Vec::new();
    for u in 0..3 {
        let key = key_with_policy(db, &format!("user{u}"), "'requests', 'day', 6, 'strict'").await;
        db.batch_execute(&format!(
            "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary) \
             VALUES ('key', {}, 'tokens', 'day', 2500, 'strict')",
            key.key_id
        ))
        .await
        .unwrap();
        secrets.push(key.secret);
    }
    db.batch_execute(
        "INSERT INTO quota.user_group (name) VALUES ('all'); \
         INSERT INTO quota.user_group_member SELECT g.group_id, u.user_id FROM quota.user_group g, quota.app_user u; \
         INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary, alert_at) \
         SELECT 'user_group', group_id, 'tokens', 'day', 600, 'graceful', '{0.1,0.25,0.5,0.75,1}' FROM quota.user_group; \
         UPDATE quota.policy SET on_exhausted = 'disable' \
         WHERE subject_type = 'user' AND metric = 'requests' AND subject_id = (SELECT min(user_id) FROM quota.app_user); \
         INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit, boundary) \
         SELECT 'key', max(key_id), 'tokens', 'minutes', 90, 'rolling', 900, 'strict' FROM quota.api_key",
    )
    .await
    .unwrap();
    secrets
}

/// One admit of a batch: which key (3: an unknown one), the request id, the estimates.
#[derive(Clone, Debug)]
struct Admit {
    key: usize,
    id: String,
    est: i64,
    max_out: i64,
}

/// A deterministic stream of numbers (no randomness in a test: a failure must repeat).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Batches of admits over the three keys and an unknown one, with bad counts and ids of
/// earlier batches (already used, or a retry of an admitted request), no id twice in a batch.
fn batches(seed: u64) -> Vec<Vec<Admit>> {
    let mut rng = Lcg(seed);
    let mut out: Vec<Vec<Admit>> = Vec::new();
    let mut used: Vec<Admit> = Vec::new();
    for b in 0..6 {
        let mut batch: Vec<Admit> = Vec::new();
        for i in 0..(3 + rng.next(10) as usize) {
            let item = if !used.is_empty() && rng.next(6) == 0 {
                // an id of an earlier batch, with the same arguments (a retry) or others
                let mut again = used[rng.next(used.len() as u64) as usize].clone();
                if rng.next(2) == 0 {
                    again.est += 1;
                }
                again
            } else {
                Admit {
                    key: rng.next(4) as usize,
                    id: format!("b{b}-{i}"),
                    est: [10, 100, 400, -1][rng.next(4) as usize],
                    max_out: [5, 50, 300][rng.next(3) as usize],
                }
            };
            if batch.iter().any(|x| x.id == item.id) {
                continue;
            }
            batch.push(item);
        }
        used.extend(batch.iter().cloned());
        out.push(batch);
    }
    out
}

fn secret(secrets: &[String], key: usize) -> String {
    secrets
        .get(key)
        .cloned()
        .unwrap_or_else(|| "sk-pgq-unknown".into())
}

/// What an answer shows a caller (key ids equal in both databases, made in the same order).
const ADMISSION: &str = "allowed, http_status, error_code, message, retry_after_s, key_id, \
    channel_id, upstream_base_url, upstream_model, ratelimit_limit::text, ratelimit_remaining::text, ratelimit_metric, ratelimit_reset_at::text";

async fn admit_many(db: &Client, secrets: &[String], batch: &[Admit]) -> Vec<String> {
    let keys: Vec<String> = batch.iter().map(|a| secret(secrets, a.key)).collect();
    let ids: Vec<String> = batch.iter().map(|a| a.id.clone()).collect();
    let models: Vec<&str> = batch.iter().map(|_| "m").collect();
    let est: Vec<i64> = batch.iter().map(|a| a.est).collect();
    let max_out: Vec<i64> = batch.iter().map(|a| a.max_out).collect();
    db.query(
        &format!(
            "SELECT row({ADMISSION})::text, sqlstate, message FROM quota.admit_many($1, $2, $3, $4, $5) ORDER BY ordinal"
        ),
        &[&keys, &ids, &models, &est, &max_out],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| match r.get::<_, Option<String>>(1) {
        Some(code) => format!("error {code}: {}", r.get::<_, String>(2)),
        None => r.get(0),
    })
    .collect()
}

async fn admit_one_by_one(db: &Client, secrets: &[String], batch: &[Admit]) -> Vec<String> {
    let mut answers = Vec::new();
    for a in batch {
        let got = db
            .query_one(
                &format!("SELECT row({ADMISSION})::text FROM quota.admit($1, $2, 'm', $3, $4)"),
                &[&secret(secrets, a.key), &a.id, &a.est, &a.max_out],
            )
            .await;
        answers.push(match got {
            Ok(r) => r.get(0),
            Err(e) => {
                let e = e.as_db_error().expect("an engine error").clone();
                format!("error {}: {}", e.code().code(), e.message())
            }
        });
    }
    answers
}

/// Settles (or names unknown ids, bad counts) for the ids of a batch.
fn settles(batch: &[Admit], seed: u64) -> Vec<(String, i64, i64)> {
    let mut rng = Lcg(seed);
    let mut out: Vec<(String, i64, i64)> = batch
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                [5, 80, -3][rng.next(3) as usize],
                [1, 40][rng.next(2) as usize],
            )
        })
        .collect();
    out.push(("never-admitted".into(), 1, 1));
    // a settle repeated in its batch: the repeat is answered as a replay of the first
    if let Some(first) = out.first().cloned() {
        out.push(first);
    }
    out
}

const SETTLEMENT: &str = "settled, billed, unbilled_reason, cost::text, replay";

async fn settle_many(db: &Client, items: &[(String, i64, i64)]) -> Vec<String> {
    let ids: Vec<&str> = items.iter().map(|s| s.0.as_str()).collect();
    let input: Vec<i64> = items.iter().map(|s| s.1).collect();
    let output: Vec<i64> = items.iter().map(|s| s.2).collect();
    db.query(
        &format!("SELECT row({SETTLEMENT})::text, sqlstate, message FROM quota.settle_many($1, $2, $3) ORDER BY ordinal"),
        &[&ids, &input, &output],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| match r.get::<_, Option<String>>(1) {
        Some(code) => format!("error {code}: {}", r.get::<_, String>(2)),
        None => r.get(0),
    })
    .collect()
}

async fn settle_one_by_one(db: &Client, items: &[(String, i64, i64)]) -> Vec<String> {
    let mut answers = Vec::new();
    for (id, input, output) in items {
        let got = db
            .query_one(
                &format!("SELECT row({SETTLEMENT})::text FROM quota.settle($1, $2, $3)"),
                &[id, input, output],
            )
            .await;
        answers.push(match got {
            Ok(r) => r.get(0),
            Err(e) => {
                let e = e.as_db_error().expect("an engine error").clone();
                format!("error {}: {}", e.code().code(), e.message())
            }
        });
    }
    answers
}

/// What the counters (with their spent marks), reservations, ledger, daily rollups, keys'
/// suspensions and the engine's events (in the order they were logged, with whose request
/// logged them) hold, for comparing two databases (the admins' events carry wall-clock times;
/// an empty counter is no counter: a batch creates those of every channel it may route to).
async fn state(db: &Client) -> String {
    let q = "SELECT (SELECT string_agg(format('%s/%s used %s reserved %s spent %s', policy_id, scope_id, used, reserved, exhausted_at), '; ' ORDER BY policy_id, scope_id) FROM quota.counter \
                     WHERE used <> 0 OR reserved <> 0 OR exhausted_at IS NOT NULL), \
                    (SELECT string_agg(request_id, ',' ORDER BY request_id) FROM quota.reservation), \
                    (SELECT string_agg(format('%s %s %s', request_id, cost, billed), ',' ORDER BY request_id) FROM quota.usage_ledger), \
                    (SELECT string_agg(format('%s %s %s %s %s %s %s', key_id, model, requests, input_tokens, output_tokens, cost, unbilled), '; ' ORDER BY key_id, model) FROM quota.usage_daily), \
                    (SELECT string_agg(format('%s %s %s %s', key_id, enabled, suspended_until, suspended_by), '; ' ORDER BY key_id) FROM quota.api_key), \
                    (SELECT string_agg(format('%s %s %s %s', kind, policy_id, key_id, detail), '; ' ORDER BY event_id) FROM quota.event \
                     WHERE kind IN ('exhausted', 'recovered', 'disabled', 'resumed', 'threshold_crossed'))";
    let r = db.query_one(q, &[]).await.unwrap();
    (0..6)
        .map(|i| format!("{:?}", r.get::<_, Option<String>>(i)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Model m served by three channels: a disabled one of the highest priority, then one capped
/// at 600 tokens a day, then one capped at 5 requests a day (distinct priorities: routing is
/// random only among equals). Requests move to the second as the first fills, then are refused
/// when both are full.
const CHANNELS: &str = "\
    INSERT INTO quota.channel (name, base_url, api_key, priority, status) VALUES \
        ('off', 'http://127.0.0.1:9/off', 'sk-off', 20, 'disabled'), ('first', 'http://127.0.0.1:9/first', 'sk-1', 10, 'enabled'), \
        ('second', 'http://127.0.0.1:9/second', 'sk-2', 5, 'enabled'); \
    INSERT INTO quota.channel_model (channel_id, model, upstream_model) SELECT channel_id, 'm', 'up-' || name FROM quota.channel; \
    INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary) \
    SELECT 'channel', channel_id, 'tokens', 'day', 600, 'strict' FROM quota.channel WHERE name = 'first' \
    UNION ALL SELECT 'channel', channel_id, 'requests', 'day', 5, 'strict' FROM quota.channel WHERE name = 'second'";

#[tokio::test]
async fn a_batch_answers_as_the_same_single_calls_in_its_order() {
    equivalence(false).await;
}

#[tokio::test]
async fn a_batch_routes_to_channels_as_the_same_single_calls_in_its_order() {
    equivalence(true).await;
}

/// Batches of admits and settles against the same calls one by one, in two databases set up
/// alike (with `channels`, model m is routed: see CHANNELS): the same answers, and the same
/// state after every batch.
async fn equivalence(channels: bool) {
    for seed in [1u64, 7, 42] {
        let batched = connect(&fresh_database("pgq_batch_many").await).await;
        let single = connect(&fresh_database("pgq_batch_single").await).await;
        let (sb, ss) = (three_keys(&batched).await, three_keys(&single).await);
        if channels {
            batched.batch_execute(CHANNELS).await.unwrap();
            single.batch_execute(CHANNELS).await.unwrap();
        }
        batched.batch_execute(NOW).await.unwrap();
        single.batch_execute(NOW).await.unwrap();
        let mut answers: Vec<String> = Vec::new();
        for (b, batch) in batches(seed).iter().enumerate() {
            let many = admit_many(&batched, &sb, batch).await;
            let one = admit_one_by_one(&single, &ss, batch).await;
            assert_eq!(many, one, "seed {seed}, admit batch {b}: {batch:?}");
            answers.extend(many);
            if b % 2 == 1 {
                let items = settles(batch, seed + b as u64);
                assert_eq!(
                    settle_many(&batched, &items).await,
                    settle_one_by_one(&single, &items).await,
                    "seed {seed}, settle batch {b}"
                );
            }
            assert_eq!(
                state(&batched).await,
                state(&single).await,
                "seed {seed}, after batch {b}"
            );
        }
        assert!(
            answers.iter().any(|a| a.starts_with("(f,429,")),
            "seed {seed}: some item met a spent limit"
        );
        assert!(
            answers.iter().any(|a| a.starts_with("error PQ409")),
            "seed {seed}: some item reused an id"
        );
        assert!(
            answers.iter().any(|a| a.starts_with("error PQ400")),
            "seed {seed}: some item had a bad count"
        );
        let crossed: i64 = batched
            .query_one("SELECT count(*) FROM quota.event WHERE kind = 'threshold_crossed'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(crossed >= 2, "seed {seed}: the group's thresholds were crossed ({crossed})");
        if channels {
            for (what, needle) in [
                ("routed to the first channel", "up-first"),
                ("routed to the second", "up-second"),
                ("refused with both full", "all_channels_exhausted"),
            ] {
                assert!(answers.iter().any(|a| a.contains(needle)), "seed {seed}: some item was {what}");
            }
        }
        assert_no_drift(&batched).await;
    }
}

#[tokio::test]
async fn an_id_named_twice_in_a_batch_is_refused_for_the_second_item_only() {
    let db = connect(&fresh_database("pgq_batch_twice").await).await;
    let secrets = three_keys(&db).await;
    let batch = vec![
        Admit {
            key: 0,
            id: "twice".into(),
            est: 10,
            max_out: 10,
        },
        Admit {
            key: 1,
            id: "other".into(),
            est: 10,
            max_out: 10,
        },
        Admit {
            key: 0,
            id: "twice".into(),
            est: 10,
            max_out: 10,
        },
    ];
    let got = admit_many(&db, &secrets, &batch).await;
    assert!(got[0].starts_with("(t,200"), "{got:?}");
    assert!(got[1].starts_with("(t,200"), "{got:?}");
    assert_eq!(
        got[2],
        "error PQ409: admit: request_id twice was already used in this batch"
    );
    let reserved: i64 = db
        .query_one("SELECT count(*) FROM quota.reservation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reserved, 2, "the repeated item holds nothing");
}

#[tokio::test]
async fn arrays_of_different_lengths_refuse_the_whole_call() {
    let db = connect(&fresh_database("pgq_batch_lengths").await).await;
    let err = db
        .query(
            "SELECT * FROM quota.admit_many(ARRAY['a','b'], ARRAY['r1'], ARRAY['m','m'], ARRAY[1,1]::bigint[], ARRAY[1,1]::bigint[])",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "PQ400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_in_opposite_orders_neither_deadlock_nor_overshoot() {
    let dsn = fresh_database("pgq_batch_opposite").await;
    let db = connect(&dsn).await;
    let secrets = three_keys(&db).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (dsn, secrets) = (dsn.clone(), secrets.clone());
        tasks.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            let mut admitted = Vec::new();
            for round in 0..5 {
                // every key, forwards in even workers and backwards in odd ones
                let mut batch: Vec<Admit> = (0..3)
                    .flat_map(|k| (0..2).map(move |j| (k, j)))
                    .map(|(k, j)| Admit {
                        key: k,
                        id: format!("w{w}-r{round}-k{k}-{j}"),
                        est: 10,
                        max_out: 10,
                    })
                    .collect();
                if w % 2 == 1 {
                    batch.reverse();
                }
                let answers = admit_many(&c, &secrets, &batch).await;
                for (a, answer) in batch.iter().zip(answers) {
                    if answer.starts_with("(t,") {
                        admitted.push((a.key, a.id.clone()));
                    }
                }
                let items: Vec<(String, i64, i64)> =
                    admitted.drain(..).map(|(_, id)| (id, 10, 10)).collect();
                if !items.is_empty() {
                    settle_many(&c, &items).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("no batch failed (a deadlock would have)");
    }
    let per_user: Vec<i64> = db
        .query(
            "SELECT count(*) FROM quota.usage_ledger GROUP BY user_id ORDER BY user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        per_user,
        vec![6, 6, 6],
        "each strict limit of 6 requests is reached, never overshot"
    );
    let reserved: i64 = db
        .query_one("SELECT count(*) FROM quota.reservation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reserved, 0);
    assert_no_drift(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_strict_key_relayed_by_64_connections_through_a_batching_relay_admits_its_limit() {
    let r = relayed(
        "pgq_batch_relay",
        "'requests', 'day', 50, 'strict'",
        &["--batch-max", "64"],
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let req = r.chat(json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}), &[]);
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let resp = req.try_clone().unwrap().send().await.unwrap();
                statuses.push(resp.status().as_u16());
            }
            statuses
        }));
    }
    let mut ok = 0;
    for t in tasks {
        for status in t.await.unwrap() {
            assert!(status == 200 || status == 429, "status {status}");
            ok += usize::from(status == 200);
        }
    }
    assert_eq!(ok, 50, "exactly the strict limit is admitted");
    eventually("every admitted request settled", SETTLE_WITHIN, || async {
        let n: i64 =
            r.db.query_one("SELECT count(*) FROM quota.usage_ledger", &[])
                .await
                .unwrap()
                .get(0);
        n == 50
    })
    .await;
    let reserved: i64 =
        r.db.query_one("SELECT count(*) FROM quota.reservation", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(reserved, 0);
    assert_no_drift(&r.db).await;
}
