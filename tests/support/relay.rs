//! The relay end to end: a database with a priced model and a key, the mock upstream, the real
//! relay binary in front of it, and the checks the relay tests share (OpenAI error shape, SSE,
//! ledger rows, counters).
use crate::{connect, eventually, fresh_database, key_with_policy, Key, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_postgres::Client;

/// Settlement runs after the reply has gone out; this bounds how long a test waits for it.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(5);

/// A database with priced models, a key, the mock upstream and a relay in front of it.
pub struct Relayed {
    /// the database's DSN, for another relay on it
    pub dsn: String,
    pub db: Client,
    pub key: Key,
    pub mock: Server,
    pub relay: Server,
    pub http: reqwest::Client,
}

/// `policy_values` as in `key_with_policy`; `relay_args` are extra `serve` flags.
pub async fn relayed(dbname: &str, policy_values: &str, relay_args: &[&str]) -> Relayed {
    let dsn = fresh_database(dbname).await;
    relayed_on(&dsn, policy_values, relay_args).await
}

pub async fn relayed_on(dsn: &str, policy_values: &str, relay_args: &[&str]) -> Relayed {
    relayed_on_url(dsn, dsn, policy_values, relay_args).await
}

/// `relayed_on`, the relay given `database_url` (several hosts, say) instead of `dsn`.
pub async fn relayed_on_url(dsn: &str, database_url: &str, policy_values: &str, relay_args: &[&str]) -> Relayed {
    let db = connect(dsn).await;
    db.batch_execute(
        "INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok, cached_input_per_mtok) \
         VALUES ('gpt-4o', 2.50, 10.00, 1.25)",
    )
    .await
    .unwrap();
    let key = key_with_policy(&db, "alice", policy_values).await;
    let mock = Server::mock_upstream().await;
    let relay = Server::relay(database_url, &format!("{}/v1", mock.url), relay_args).await;
    Relayed {
        dsn: dsn.to_string(),
        db,
        key,
        mock,
        relay,
        http: reqwest::Client::new(),
    }
}

impl Relayed {
    /// `POST /v1/chat/completions` with the key; `mock` are `x-mock-*` headers for the upstream.
    pub fn chat(&self, body: Value, mock: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(format!("{}/v1/chat/completions", self.relay.url))
            .bearer_auth(&self.key.secret)
            .json(&body);
        for (name, value) in mock {
            req = req.header(*name, *value);
        }
        req
    }

    /// A channel `acct-1` on the mock upstream, with its own key `sk-channel-1`, serving
    /// `model` under the upstream's name `upstream_model`; returns its id.
    pub async fn channel(&self, model: &str, upstream_model: &str) -> i64 {
        let channel: i64 = self
            .db
            .query_one(
                "INSERT INTO quota.channel (name, base_url, api_key) VALUES ('acct-1', $1, 'sk-channel-1')
                 RETURNING channel_id",
                &[&format!("{}/v1", self.mock.url)],
            )
            .await
            .unwrap()
            .get(0);
        self.db
            .execute(
                "INSERT INTO quota.channel_model VALUES ($1, $2, $3)",
                &[&channel, &model, &upstream_model],
            )
            .await
            .unwrap();
        channel
    }

    /// Waits for the ledger row of `request_id`; returns
    /// (input, output, cached, billed, cost as text).
    pub async fn ledger_row(&self, request_id: &str) -> (i64, i64, i64, bool, String) {
        let sql = "SELECT input_tokens, output_tokens, cached_tokens, billed, cost::text \
                   FROM quota.usage_ledger WHERE request_id = $1";
        eventually(
            &format!("ledger row of {request_id}"),
            SETTLE_WITHIN,
            || async {
                self.db
                    .query_opt(sql, &[&request_id])
                    .await
                    .unwrap()
                    .is_some()
            },
        )
        .await;
        let r = self.db.query_one(sql, &[&request_id]).await.unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    }

    pub async fn ledger_rows(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM quota.usage_ledger", &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn wait_ledger_rows(&self, n: i64) {
        eventually(&format!("{n} ledger rows"), SETTLE_WITHIN, || async {
            self.ledger_rows().await == n
        })
        .await;
    }

    /// Waits until `n` reservations have been refunded for `reason`.
    pub async fn wait_refunds(&self, reason: &str, n: i64) {
        let sql = "SELECT count(*) FROM quota.released WHERE kind = 'refunded' AND reason = $1";
        eventually(&format!("{n} refunds ({reason})"), SETTLE_WITHIN, || async {
            self.db.query_one(sql, &[&reason]).await.unwrap().get::<_, i64>(0) == n
        })
        .await;
    }

    pub async fn reservations(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM quota.reservation", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// `used` and `reserved` of each policy of the key (`quota.status`), as text, by metric.
    pub async fn status(&self) -> Vec<(String, String, String)> {
        self.db
            .query(
                "SELECT metric, used::text, reserved::text FROM quota.status($1) ORDER BY policy_id",
                &[&self.key.key_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Is `cost` (text from the ledger) exactly `expected`? Compared as NUMERIC in SQL.
    pub async fn cost_is(&self, cost: &str, expected: &str) -> bool {
        self.db
            .query_one(
                "SELECT $1::text::numeric = $2::text::numeric",
                &[&cost, &expected],
            )
            .await
            .unwrap()
            .get(0)
    }
}

pub fn request_id(resp: &reqwest::Response) -> String {
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req_"), "{id}");
    id
}

/// Asserts the OpenAI error shape `{"error": {"message", "type", "param", "code"}}` with this
/// status, type and code; returns the error object.
pub async fn openai_error(resp: reqwest::Response, status: u16, kind: &str, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let body: Value = resp.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert!(error.as_object().unwrap().contains_key("param"), "{body}");
    error.clone()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// Appends what a response stream delivers to `text` until it holds `events` SSE data events,
/// or (None) until the stream ends.
pub async fn read_sse<B: AsRef<[u8]>>(
    chunks: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    text: &mut String,
    events: Option<usize>,
) {
    while events.is_none_or(|n| sse_data(text).len() < n) {
        let Some(chunk) = chunks.next().await else {
            assert!(events.is_none(), "the stream ended before {events:?} events: {text}");
            return;
        };
        text.push_str(std::str::from_utf8(chunk.unwrap().as_ref()).unwrap());
    }
}

pub fn chat_body(max_tokens: i64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something."}]})
}

/// Runs `serve` against `database_url`, expecting it to stop at start-up with exit code 2;
/// returns what it printed on stderr.
pub async fn refused_start(database_url: &str, extra: &[&str]) -> String {
    let bin = std::env::var("PGQ_RELAY_BIN").expect("PGQ_RELAY_BIN is set by scripts/test.sh");
    let run = tokio::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("DATABASE_URL", database_url)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the relay gave up within 30 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}
