//! `pg-quota-relay notify`: follows `quota.event` and POSTs the events of the chosen kinds to
//! webhooks, at least once.
//!
//! - **Cursor.** `quota.notifier_cursor` holds the last event the notifier has handled. It moves
//!   on in the transaction that records the outcome of that event's deliveries (failures go to
//!   `quota.webhook_delivery`), so a notifier that stops between a POST and that commit posts
//!   the event again after a restart: at least once, never lost. Receivers deduplicate by the
//!   event id (header `x-pgquota-event-id`, also sent as `idempotency-key`).
//! - **Wake-up.** The engine announces every event with `NOTIFY pg_quota_event`; the notifier
//!   `LISTEN`s and reads the log when told, and every `--poll-s` anyway (a notification is lost
//!   while the connection is down).
//! - **Order and gaps.** Event ids come from a sequence, so an id can commit after a higher
//!   one. The cursor moves over a missing id only once every transaction that was running
//!   when the gap was seen has ended (its event is then visible, or it rolled back), and at
//!   least a second has passed; after `GAP_GIVE_UP` it moves on regardless (logged).
//! - **Retries.** A failed POST (no answer, or a status other than 2xx) is retried from the
//!   table with exponential backoff (`--retry-s`, doubling, at most `--retry-max-s`) until it
//!   succeeds (`delivered`) or `--max-attempts` is spent (`failed`). A restarted notifier carries
//!   on with the rows it finds there.
//! - **Signature.** With `--webhook-secret`, each POST carries `x-pgquota-timestamp` (Unix
//!   seconds) and `x-pgquota-signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::config::{NotifyArgs, WebhookFormat};
use crate::db_tls::{self, Connector};
use crate::server::{announce, shutdown_signal};

/// The channel the engine NOTIFYs on (sql/schema/70_alerts.sql).
pub const CHANNEL: &str = "pg_quota_event";

/// How long a gap in the event ids may hold the cursor back at the most.
const GAP_GIVE_UP: Duration = Duration::from_secs(300);
/// How long a gap holds the cursor back at the least (an id drawn just before its
/// transaction got an id of its own).
const GAP_MIN: Duration = Duration::from_secs(1);
/// Events read at once.
const BATCH: i64 = 200;

/// One event of the log, as the webhooks receive it.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: i64,
    pub at: String,
    pub kind: String,
    pub policy_id: Option<i64>,
    pub key_id: Option<i64>,
    pub user_id: Option<i64>,
    pub detail: Value,
}

/// The body of a delivery.
pub fn payload(event: &Event, format: WebhookFormat) -> Value {
    match format {
        WebhookFormat::Json => json!({
            "event_id": event.event_id,
            "kind": event.kind,
            "at": event.at,
            "policy_id": event.policy_id,
            "key_id": event.key_id,
            "user_id": event.user_id,
            "detail": event.detail,
        }),
        WebhookFormat::Slack => json!({ "text": summary(event) }),
    }
}

/// One line of text for a chat channel. Amounts are shown as the engine wrote them.
pub fn summary(event: &Event) -> String {
    let d = &event.detail;
    let text = |k: &str| match &d[k] {
        Value::Null => "?".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let policy = event.policy_id.map_or("?".into(), |p| p.to_string());
    let key = event
        .key_id
        .map_or(String::new(), |k| format!(" (key {k})"));
    let line = match event.kind.as_str() {
        "threshold_crossed" => format!(
            "Policy {policy} ({} {}) has used {} of its {} limit: {} of {}{key}, in the window from {}.",
            text("subject_type"),
            text("subject_id"),
            percent(&d["threshold"]),
            text("metric"),
            text("used"),
            text("limit"),
            text("window_start"),
        ),
        "exhausted" => format!("Policy {policy} is exhausted{key}, in the window from {}.", text("window_start")),
        "disabled" => format!("Policy {policy} suspended a key{key} until {}.", text("until")),
        "shadow_refusal" => format!(
            "Shadow policy {policy} would have refused a request{key}: {} of {} used, in the window from {}.",
            text("used"),
            text("limit"),
            text("window_start"),
        ),
        kind => format!("{kind} (policy {policy}){key}."),
    };
    format!("pg_quota: {line} [event {}]", event.event_id)
}

/// A fraction (0.8) as a percentage (80 %), for text only.
fn percent(fraction: &Value) -> String {
    let Some(f) = fraction
        .as_f64()
        .or_else(|| fraction.as_str().and_then(|s| s.parse().ok()))
    else {
        return "?".into();
    };
    format!("{} %", (f * 10_000.0).round() / 100.0)
}

/// `v1=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`: what `x-pgquota-signature` carries.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// The wait before retry number `attempt` (1 = the first retry): `base` doubled each time, at
/// most `max`.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    base.saturating_mul(1u32 << exp).min(max)
}

/// How a webhook URL is named in the database and the logs: its host and the first hex digits
/// of its SHA-256, never its path (a Slack URL's path is its secret).
pub fn target_label(url: &str) -> String {
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            })
        })
        .unwrap_or_else(|| "invalid-url".into());
    let digest = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{host}#{hex}")
}

struct Target {
    url: String,
    label: String,
}

struct Notifier {
    name: String,
    targets: Vec<Target>,
    kinds: Option<HashSet<String>>,
    format: WebhookFormat,
    secret: Option<Vec<u8>>,
    http: reqwest::Client,
    poll: Duration,
    retry: Duration,
    retry_max: Duration,
    max_attempts: i32,
    from_start: bool,
}

/// A gap in the event ids that holds the cursor back: the missing id, the snapshot's xmax when
/// it was seen (transactions below it had begun by then), and when.
struct Gap {
    event_id: i64,
    xmax: i64,
    since: Instant,
}

pub async fn run(args: NotifyArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("pg-quota-relay notify: {msg}");
        ExitCode::from(2)
    };
    let pg = match crate::db::parse_database_url(&args.database.database_url) {
        Ok(pg) => pg,
        Err(e) => return fail(e),
    };
    let files = args.database.tls_files();
    let (connector, db_tls) = match db_tls::connector(&pg, files) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut targets = Vec::new();
    for url in &args.webhook_urls {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => targets.push(Target {
                url: url.clone(),
                label: target_label(url),
            }),
            _ => {
                return fail(format!(
                    "--webhook-url {}: not an http(s) URL",
                    target_label(url)
                ))
            }
        }
    }
    let secs = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{what}: a positive number of seconds, got {s}"))
    };
    let durations = (|| {
        Ok::<_, String>((
            secs("--poll-s", args.poll_s)?,
            secs("--retry-s", args.retry_s)?,
            secs("--retry-max-s", args.retry_max_s)?,
            secs("--timeout-s", args.timeout_s)?,
        ))
    })();
    let (poll, retry, retry_max, timeout) = match durations {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    if args.max_attempts < 1 {
        return fail("--max-attempts: at least 1".into());
    }
    let http = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(h) => h,
        Err(e) => return fail(format!("cannot build the HTTP client: {e}")),
    };
    let kinds = (!args.kinds.iter().any(|k| k.trim() == "all"))
        .then(|| args.kinds.iter().map(|k| k.trim().to_string()).collect());
    if args.webhook_secret.is_none() {
        tracing::warn!("--webhook-secret is not set: deliveries are not signed");
    }
    let notifier = Notifier {
        name: args.name.clone(),
        targets,
        kinds,
        format: args.format,
        secret: args.webhook_secret.map(String::into_bytes),
        http,
        poll,
        retry,
        retry_max,
        max_attempts: args.max_attempts,
        from_start: args.from_start,
    };
    let target = crate::db::describe_target(&pg);
    tracing::info!(database = %target, database_tls = %db_tls, notifier = %notifier.name,
                   webhooks = notifier.targets.len(), "notifier starting");

    let mut announced = false;
    let mut failures: u32 = 0;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let session = notifier.session(&pg, &connector, &mut announced);
        let outcome = tokio::select! {
            outcome = session => outcome,
            _ = &mut stop => return ExitCode::SUCCESS,
        };
        if let Err(e) = outcome {
            failures += 1;
            let wait = backoff(
                failures.min(6) as i32,
                Duration::from_secs(1),
                Duration::from_secs(30),
            );
            tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "notifier: database session ended");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut stop => return ExitCode::SUCCESS,
            }
        }
    }
}

/// Connects and forwards the connection's notifications to the returned receiver.
async fn connect(
    pg: &tokio_postgres::Config,
    connector: &Connector,
) -> Result<(Client, mpsc::UnboundedReceiver<()>), tokio_postgres::Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = match connector {
        Connector::Plain => {
            let (client, conn) = pg.connect(NoTls).await?;
            tokio::spawn(drive(conn, tx));
            client
        }
        Connector::Tls(tls) => {
            let (client, conn) = pg.connect(tls.clone()).await?;
            tokio::spawn(drive(conn, tx));
            client
        }
    };
    Ok((client, rx))
}

/// Runs a connection, telling `wake` of every notification; ends with it.
async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, wake: mpsc::UnboundedSender<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(_)) => {
                let _ = wake.send(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "notifier: database connection lost");
                break;
            }
        }
    }
}

type SessionResult = Result<(), String>;

impl Notifier {
    /// One database session: lock the name, LISTEN, then deliver until the connection fails.
    async fn session(
        &self,
        pg: &tokio_postgres::Config,
        connector: &Connector,
        announced: &mut bool,
    ) -> SessionResult {
        let db = |e: tokio_postgres::Error| e.to_string();
        let (client, mut wake) = connect(pg, connector).await.map_err(db)?;
        // one notifier per name: a session-level advisory lock, released when the connection ends
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('pg_quota notifier'), hashtext($1))",
                &[&self.name],
            )
            .await
            .map_err(db)?
            .get(0);
        if !locked {
            return Err(format!("another notifier named {:?} is running", self.name));
        }
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(db)?;
        client
            .execute(
                "INSERT INTO quota.notifier_cursor (notifier, last_event_id)
                 SELECT $1, CASE WHEN $2 THEN 0 ELSE coalesce(max(e.event_id), 0) END FROM quota.event e
                 ON CONFLICT (notifier) DO NOTHING",
                &[&self.name, &self.from_start],
            )
            .await
            .map_err(db)?;
        client
            .execute(
                "DELETE FROM quota.webhook_delivery d WHERE d.notifier = $1 AND d.status = 'delivered'
                   AND d.updated_at < now() - interval '7 days'",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        if !*announced {
            announce(&format!(
                "pg-quota-relay notify listening on {CHANNEL} (notifier {})",
                self.name
            ));
            *announced = true;
        }
        let mut gap: Option<Gap> = None;
        loop {
            self.deliver_new(&client, &mut gap).await?;
            self.retry_due(&client).await?;
            let mut wait = self.poll;
            if gap.is_some() {
                wait = wait.min(Duration::from_millis(250));
            }
            let next_due: Option<f64> = client
                .query_one(
                    "SELECT extract(epoch FROM min(d.next_attempt_at) - now())::float8 FROM quota.webhook_delivery d
                     WHERE d.notifier = $1 AND d.status = 'retrying'",
                    &[&self.name],
                )
                .await
                .map_err(db)?
                .get(0);
            if let Some(due) = next_due {
                wait = wait.min(Duration::from_secs_f64(due.clamp(0.05, 3600.0)));
            }
            tokio::select! {
                woken = wake.recv() => {
                    if woken.is_none() {
                        return Err("database connection lost".into());
                    }
                    while wake.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Delivers the events after the cursor, in id order, moving the cursor over each.
    async fn deliver_new(&self, client: &Client, gap: &mut Option<Gap>) -> SessionResult {
        let db = |e: tokio_postgres::Error| e.to_string();
        loop {
            // Whether a pending gap may be passed is judged before the events are read, so an
            // event that commits in between is read, not skipped.
            let gap_passable = match gap {
                None => false,
                Some(g) => {
                    let xmin: i64 = client
                        .query_one(
                            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                            &[],
                        )
                        .await
                        .map_err(db)?
                        .get(0);
                    let waited = g.since.elapsed();
                    if waited >= GAP_GIVE_UP {
                        tracing::warn!(
                            event_id = g.event_id,
                            "notifier: an event id never appeared; moving on"
                        );
                    }
                    (xmin >= g.xmax && waited >= GAP_MIN) || waited >= GAP_GIVE_UP
                }
            };
            let cursor: i64 = client
                .query_one(
                    "SELECT c.last_event_id FROM quota.notifier_cursor c WHERE c.notifier = $1",
                    &[&self.name],
                )
                .await
                .map_err(db)?
                .get(0);
            let rows = client
                .query(
                    "SELECT e.event_id, to_json(e.at) #>> '{}', e.kind, e.policy_id, e.key_id, e.user_id,
                            e.detail::text, pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                     FROM quota.event e WHERE e.event_id > $1 ORDER BY e.event_id LIMIT $2",
                    &[&cursor, &BATCH],
                )
                .await
                .map_err(db)?;
            if rows.is_empty() {
                *gap = None;
                return Ok(());
            }
            let mut expected = cursor + 1;
            let mut handled = 0;
            let mut skipped_to: Option<i64> = None;
            for row in &rows {
                let event_id: i64 = row.get(0);
                if event_id != expected {
                    let passable =
                        gap_passable && gap.as_ref().is_some_and(|g| g.event_id == expected);
                    if !passable {
                        if gap.as_ref().is_none_or(|g| g.event_id != expected) {
                            *gap = Some(Gap {
                                event_id: expected,
                                xmax: row.get(7),
                                since: Instant::now(),
                            });
                        }
                        break;
                    }
                    *gap = None;
                }
                expected = event_id + 1;
                handled += 1;
                let event = Event {
                    event_id,
                    at: row.get(1),
                    kind: row.get(2),
                    policy_id: row.get(3),
                    key_id: row.get(4),
                    user_id: row.get(5),
                    detail: serde_json::from_str(row.get::<_, &str>(6)).unwrap_or(Value::Null),
                };
                if !self.wanted(&event.kind) {
                    skipped_to = Some(event_id);
                    continue;
                }
                self.deliver_first(client, &event).await?;
                skipped_to = None;
            }
            if let Some(to) = skipped_to {
                self.advance(client, to).await?;
            }
            if handled < rows.len() || (rows.len() as i64) < BATCH {
                return Ok(());
            }
        }
    }

    fn wanted(&self, kind: &str) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(kind))
    }

    async fn advance(&self, client: &Client, to: i64) -> SessionResult {
        client
            .execute(
                "UPDATE quota.notifier_cursor SET last_event_id = greatest(last_event_id, $2), updated_at = now()
                 WHERE notifier = $1",
                &[&self.name, &to],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The first delivery of an event to every webhook; the failures are recorded for retry,
    /// and the cursor moved over the event, in one transaction.
    async fn deliver_first(&self, client: &Client, event: &Event) -> SessionResult {
        let mut failed: Vec<(&Target, String)> = Vec::new();
        let posts = self
            .targets
            .iter()
            .map(|t| async move { (t, self.post(&t.url, event).await) });
        for (target, outcome) in futures_util::future::join_all(posts).await {
            match outcome {
                Ok(()) => {
                    tracing::info!(event_id = event.event_id, kind = %event.kind, target = %target.label, "delivered")
                }
                Err(e) => {
                    tracing::warn!(event_id = event.event_id, target = %target.label, error = %e, "delivery failed; will retry");
                    failed.push((target, e));
                }
            }
        }
        let db = |e: tokio_postgres::Error| e.to_string();
        client.batch_execute("BEGIN").await.map_err(db)?;
        let recorded = async {
            for (target, error) in &failed {
                let (status, next) = self.after_failure(1);
                client
                    .execute(
                        "INSERT INTO quota.webhook_delivery (notifier, event_id, target, status, attempts, last_error,
                                                             next_attempt_at, updated_at)
                         VALUES ($1, $2, $3, $4, 1, $5, now() + make_interval(secs => $6), now())
                         ON CONFLICT (notifier, event_id, target) DO NOTHING",
                        &[&self.name, &event.event_id, &target.label, &status, error, &next],
                    )
                    .await?;
            }
            client
                .execute(
                    "UPDATE quota.notifier_cursor SET last_event_id = greatest(last_event_id, $2), updated_at = now()
                     WHERE notifier = $1",
                    &[&self.name, &event.event_id],
                )
                .await?;
            client.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = recorded {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// The status and the wait (seconds) after failed attempt number `attempts`.
    fn after_failure(&self, attempts: i32) -> (&'static str, f64) {
        if attempts >= self.max_attempts {
            ("failed", 0.0)
        } else {
            (
                "retrying",
                backoff(attempts, self.retry, self.retry_max).as_secs_f64(),
            )
        }
    }

    /// Retries the deliveries that are due.
    async fn retry_due(&self, client: &Client) -> SessionResult {
        let db = |e: tokio_postgres::Error| e.to_string();
        let rows = client
            .query(
                "SELECT d.event_id, d.target, d.attempts, to_json(e.at) #>> '{}', e.kind, e.policy_id, e.key_id,
                        e.user_id, e.detail::text
                 FROM quota.webhook_delivery d LEFT JOIN quota.event e ON e.event_id = d.event_id
                 WHERE d.notifier = $1 AND d.status = 'retrying' AND d.next_attempt_at <= now()
                 ORDER BY d.next_attempt_at LIMIT 50",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        for row in rows {
            let event_id: i64 = row.get(0);
            let label: String = row.get(1);
            let attempts: i32 = row.get::<_, i32>(2) + 1;
            let kind: Option<String> = row.get(4);
            let target = self.targets.iter().find(|t| t.label == label);
            let outcome = match (target, kind) {
                (None, _) => Err("the webhook URL is no longer configured".to_string()),
                (_, None) => Err("the event is no longer in quota.event".to_string()),
                (Some(t), Some(kind)) => {
                    let event = Event {
                        event_id,
                        at: row.get(3),
                        kind,
                        policy_id: row.get(5),
                        key_id: row.get(6),
                        user_id: row.get(7),
                        detail: serde_json::from_str(row.get::<_, &str>(8)).unwrap_or(Value::Null),
                    };
                    self.post(&t.url, &event).await
                }
            };
            let (status, next, error) = match &outcome {
                Ok(()) => {
                    tracing::info!(event_id, target = %label, attempts, "delivered on retry");
                    ("delivered", None, None)
                }
                Err(e) => {
                    let (status, wait) = if target.is_none() {
                        ("failed", 0.0)
                    } else {
                        self.after_failure(attempts)
                    };
                    tracing::warn!(event_id, target = %label, attempts, error = %e, status, "delivery failed");
                    (
                        status,
                        (status == "retrying").then_some(wait),
                        Some(e.clone()),
                    )
                }
            };
            client
                .execute(
                    "UPDATE quota.webhook_delivery SET status = $4, attempts = $5, last_error = $6,
                            next_attempt_at = now() + make_interval(secs => $7), updated_at = now()
                     WHERE notifier = $1 AND event_id = $2 AND target = $3",
                    &[
                        &self.name, &event_id, &label, &status, &attempts, &error, &next,
                    ],
                )
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    /// One POST of an event to a webhook: Ok on a 2xx answer.
    async fn post(&self, url: &str, event: &Event) -> Result<(), String> {
        let body = serde_json::to_vec(&payload(event, self.format)).map_err(|e| e.to_string())?;
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("x-pgquota-event-id", event.event_id.to_string())
            .header("x-pgquota-event-kind", &event.kind)
            .header("idempotency-key", event.event_id.to_string());
        if let Some(secret) = &self.secret {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            request = request
                .header("x-pgquota-timestamp", timestamp.to_string())
                .header("x-pgquota-signature", signature(secret, timestamp, &body));
        }
        match request.body(body).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("HTTP {}", resp.status().as_u16())),
            // without the URL: its path may be a secret
            Err(e) => Err(if e.is_timeout() {
                "no answer in time".to_string()
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                "request failed".to_string()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, detail: Value) -> Event {
        Event {
            event_id: 42,
            at: "2026-06-01T10:00:00+00:00".into(),
            kind: kind.into(),
            policy_id: Some(3),
            key_id: Some(7),
            user_id: Some(5),
            detail,
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // what is signed is "<timestamp>.<body>": a receiver's HMAC of exactly that verifies
        let sig = signature(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        let hex = sig.strip_prefix("v1=").expect("v1= prefix");
        assert_eq!(hex.len(), 64);
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
        assert!(ring::hmac::verify(&key, b"1700000000.{\"a\":1}", &tag).is_ok());
        assert!(ring::hmac::verify(&key, b"1700000001.{\"a\":1}", &tag).is_err());
        // a known vector (RFC 4231, case 2) through the same HMAC
        let jefe = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let known = ring::hmac::sign(&jefe, b"what do ya want for nothing?");
        let known_hex: String = known.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            known_hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let (base, max) = (Duration::from_secs(2), Duration::from_secs(60));
        let waits: Vec<u64> = (1..=7).map(|a| backoff(a, base, max).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(1_000, base, max), max);
    }

    #[test]
    fn a_target_is_named_without_the_secret_path_of_its_url() {
        let label = target_label("https://hooks.example.com/services/T000/B000/XXXXSECRET");
        assert!(label.starts_with("hooks.example.com#"), "{label}");
        assert!(
            !label.contains("XXXX") && !label.contains("services"),
            "{label}"
        );
        assert_ne!(
            label,
            target_label("https://hooks.example.com/services/T000/B000/OTHER")
        );
        assert_eq!(
            target_label("http://127.0.0.1:8080/x").split('#').next(),
            Some("127.0.0.1:8080")
        );
    }

    #[test]
    fn the_json_payload_is_the_event_and_the_slack_payload_a_line_of_text() {
        let e = event(
            "threshold_crossed",
            json!({"threshold": 0.8, "used": 80, "limit": 100, "metric": "cost", "subject_type": "user",
                   "subject_id": 5, "window_start": "2026-06-01T00:00:00+00:00"}),
        );
        let body = payload(&e, WebhookFormat::Json);
        assert_eq!(body["event_id"], 42);
        assert_eq!(body["kind"], "threshold_crossed");
        assert_eq!(body["detail"]["threshold"], 0.8);
        let slack = payload(&e, WebhookFormat::Slack);
        assert_eq!(slack.as_object().unwrap().len(), 1, "{slack}");
        let text = slack["text"].as_str().unwrap();
        assert!(
            text.contains("80 %") && text.contains("80 of 100") && text.contains("[event 42]"),
            "{text}"
        );
        let shadow = summary(&event("shadow_refusal", json!({"used": 3, "limit": 2})));
        assert!(
            shadow.contains("would have refused") && shadow.contains("3 of 2"),
            "{shadow}"
        );
    }
}
