//! Budget alerts end to end (issue 20): a real cluster, the relay in front of the mock
//! upstream, the notifier (`pg-quota-relay notify`) and a webhook receiver in this test.
//! Requests cross 80 % and 100 % of a limit; the receiver fails for a while and the notifier
//! is killed and started again in the middle; in the end the receiver has had every alert,
//! each with a valid signature, and deduplicated by event id exactly the events of the log.
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use pg_quota_tests::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "whsec-test-secret";
const WITHIN: Duration = Duration::from_secs(30);

/// One POST the receiver answered 200: its event id header, timestamp, signature and body.
#[derive(Clone, Debug)]
struct Received {
    event_id: i64,
    timestamp: String,
    signature: String,
    body: Bytes,
}

#[derive(Default)]
struct Receiver {
    /// answer 503 to everything (a webhook that is down)
    down: AtomicBool,
    received: Mutex<Vec<Received>>,
    refused: Mutex<u32>,
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if rx.down.load(Ordering::SeqCst) {
        *rx.refused.lock().unwrap() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    rx.received.lock().unwrap().push(Received {
        event_id: header("x-pgquota-event-id").parse().unwrap_or(-1),
        timestamp: header("x-pgquota-timestamp"),
        signature: header("x-pgquota-signature"),
        body,
    });
    StatusCode::OK
}

/// A webhook receiver on 127.0.0.1:0; its URL.
async fn start_receiver(rx: Arc<Receiver>) -> String {
    let app = axum::Router::new()
        .route("/hook/secret-path", axum::routing::post(receive))
        .with_state(rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook/secret-path")
}

/// What a receiver checks: the signature is HMAC-SHA256 of "<timestamp>.<body>" under the
/// shared secret, and the timestamp is recent (against replays).
fn signature_valid(r: &Received) -> bool {
    let Some(hex) = r.signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(tag) = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let Ok(ts) = r.timestamp.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    ts.abs_diff(now) < 300 && ring::hmac::verify(&key, &signed, &tag).is_ok()
}

async fn notifier(dsn: &str, url: &str) -> Server {
    Server::spawn(
        &[
            "notify",
            "--webhook-url",
            url,
            "--kinds",
            "threshold_crossed,exhausted",
            "--poll-s",
            "0.5",
            "--retry-s",
            "0.2",
            "--retry-max-s",
            "1",
        ],
        &[("DATABASE_URL", dsn), ("PGQ_WEBHOOK_SECRET", SECRET)],
    )
    .await
}

/// The distinct event ids the receiver has had.
fn received_ids(rx: &Receiver) -> BTreeSet<i64> {
    rx.received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.event_id)
        .collect()
}

/// The ids of the events of the log the notifier is to deliver.
async fn alert_ids(r: &Relayed) -> BTreeSet<i64> {
    r.db.query(
        "SELECT event_id FROM quota.event WHERE kind IN ('threshold_crossed', 'exhausted')",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

async fn requests(r: &Relayed, n: usize) {
    let before = r.ledger_rows().await;
    for _ in 0..n {
        let resp = r.chat(chat_body(10), &[]).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    r.wait_ledger_rows(before + n as i64).await;
}

#[tokio::test]
async fn alerts_reach_a_webhook_once_each_across_a_notifier_restart_with_valid_signatures() {
    // 5 requests a day, alerts at 80 % and 100 %.
    let r = relayed("pgq_alerts_e2e", "'requests', 'day', 5, 'strict'", &[]).await;
    r.db.batch_execute("UPDATE quota.policy SET alert_at = '{0.8, 1}'")
        .await
        .unwrap();
    let rx = Arc::new(Receiver::default());
    let url = start_receiver(rx.clone()).await;
    let mut notify = notifier(&r.dsn, &url).await;

    // 4 of 5: 80 % crossed, delivered.
    requests(&r, 4).await;
    eventually("the 80 % alert at the webhook", WITHIN, || async {
        received_ids(&rx).len() == 1
    })
    .await;
    let first = rx.received.lock().unwrap()[0].clone();
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["kind"], "threshold_crossed");
    assert_eq!(body["event_id"], first.event_id);
    assert_eq!(body["detail"]["threshold"], 0.8);
    assert_eq!(
        (
            body["detail"]["used"].clone(),
            body["detail"]["limit"].clone()
        ),
        (4.into(), 5.into())
    );
    assert_eq!(body["key_id"], r.key.key_id);

    // The webhook goes down; the 5th request crosses 100 % and exhausts the window. The failed
    // deliveries are visible, due for a retry.
    rx.down.store(true, Ordering::SeqCst);
    requests(&r, 1).await;
    let failed = "SELECT count(*) FROM quota.webhook_delivery WHERE status = 'retrying' AND last_error = 'HTTP 503'";
    eventually("two failed deliveries recorded", WITHIN, || async {
        r.db.query_one(failed, &[]).await.unwrap().get::<_, i64>(0) == 2
    })
    .await;
    let refused = r.chat(chat_body(10), &[]).send().await.unwrap();
    assert_eq!(refused.status(), 429);

    // The notifier is killed. Meanwhile the webhook comes back, an admin resets the policy and
    // 4 more requests cross 80 % again.
    notify.child.kill().await.unwrap();
    rx.down.store(false, Ordering::SeqCst);
    r.db.batch_execute("SELECT quota.reset(policy_id) FROM quota.policy")
        .await
        .unwrap();
    requests(&r, 4).await;
    assert_eq!(
        alert_ids(&r).await.len(),
        4,
        "80 %, 100 %, exhausted, 80 % again"
    );

    // Started again, it retries what failed and delivers what it had not read yet.
    let _notify = notifier(&r.dsn, &url).await;
    let expected = alert_ids(&r).await;
    eventually("every alert at the webhook", WITHIN, || async {
        received_ids(&rx) == expected
    })
    .await;
    eventually("the failed deliveries marked delivered", WITHIN, || async {
        r.db.query_one("SELECT count(*) FILTER (WHERE status = 'delivered') = 2 AND count(*) = 2 FROM quota.webhook_delivery", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;

    let received = rx.received.lock().unwrap().clone();
    assert!(*rx.refused.lock().unwrap() >= 2);
    for delivery in &received {
        assert!(signature_valid(delivery), "invalid signature: {delivery:?}");
        let body: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(
            body["event_id"], delivery.event_id,
            "the header names the body's event"
        );
    }
    // Deduplicated by event id, the receiver has exactly the log's alerts: 80 %, 100 %,
    // exhausted, 80 % after the reset.
    let kinds: Vec<(String, Option<f64>)> = expected
        .iter()
        .map(|id| {
            let d = received.iter().find(|d| d.event_id == *id).unwrap();
            let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
            (
                body["kind"].as_str().unwrap().to_string(),
                body["detail"]["threshold"].as_f64(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("threshold_crossed".to_string(), Some(0.8)),
            ("threshold_crossed".to_string(), Some(1.0)),
            ("exhausted".to_string(), None),
            ("threshold_crossed".to_string(), Some(0.8)),
        ]
    );
    // A tampered body does not verify.
    let mut forged = received[0].clone();
    forged.body = Bytes::from(String::from_utf8_lossy(&forged.body).replace("0.8", "0.1"));
    assert!(!signature_valid(&forged));
    let cursor: i64 =
        r.db.query_one(
            "SELECT last_event_id FROM quota.notifier_cursor WHERE notifier = 'default'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cursor >= *expected.last().unwrap());
}

#[tokio::test]
async fn an_event_that_commits_after_a_later_one_is_delivered_too() {
    // Event ids come from a sequence: a transaction can draw an id, and a later id commit
    // first. The notifier must not move its cursor over the earlier id while that
    // transaction may still commit.
    let dsn = fresh_database("pgq_alerts_gap").await;
    let db = connect(&dsn).await;
    let rx = Arc::new(Receiver::default());
    let url = start_receiver(rx.clone()).await;
    let _notify = Server::spawn(
        &[
            "notify",
            "--webhook-url",
            &url,
            "--kinds",
            "all",
            "--poll-s",
            "0.2",
        ],
        &[("DATABASE_URL", &dsn), ("PGQ_WEBHOOK_SECRET", SECRET)],
    )
    .await;
    let insert = "INSERT INTO quota.event (at, kind) VALUES (now(), 'reset') RETURNING event_id";
    let slow = connect(&dsn).await;
    slow.batch_execute("BEGIN").await.unwrap();
    let earlier: i64 = slow.query_one(insert, &[]).await.unwrap().get(0);
    let later: i64 = db.query_one(insert, &[]).await.unwrap().get(0);
    assert!(later > earlier);
    slow.batch_execute("COMMIT").await.unwrap();
    eventually("both events at the webhook", WITHIN, || async {
        let ids = received_ids(&rx);
        ids.contains(&earlier) && ids.contains(&later)
    })
    .await;
    // and one that rolls back leaves a gap the notifier moves past
    slow.batch_execute("BEGIN").await.unwrap();
    let rolled_back: i64 = slow.query_one(insert, &[]).await.unwrap().get(0);
    slow.batch_execute("ROLLBACK").await.unwrap();
    let last: i64 = db.query_one(insert, &[]).await.unwrap().get(0);
    eventually("the event after a rolled-back one", WITHIN, || async {
        received_ids(&rx).contains(&last)
    })
    .await;
    assert!(!received_ids(&rx).contains(&rolled_back));
    assert!(rx.received.lock().unwrap().iter().all(signature_valid));
}
