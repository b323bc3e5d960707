//! The relay's side of the SQL contract: pool set-up and the lifecycle calls
//! (`quota.admit`, `quota.settle`, `quota.refund`, `quota.models`), each one prepared
//! statement on a pooled connection.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use tokio_postgres::Row;

use crate::db_tls::DbTls;
use crate::error::DbError;

/// Every column is cast in SQL so that the relay does not depend on the engine's exact column
/// types; numerics are read as text (exact money, never f64). The reset instant is turned into
/// seconds on the engine's clock, `quota.clock()` (which honours `pg_quota.fake_now`); NULL stays NULL (the
/// header is then left out) and negatives are clamped to 0 when the header is written.
pub const ADMIT_SQL: &str = "\
SELECT allowed::boolean, http_status::int, error_code::text, message::text, \
retry_after_s::bigint, key_id::bigint, user_id::bigint, channel_id::bigint, \
upstream_base_url::text, upstream_api_key::text, upstream_model::text, \
ratelimit_limit::text, ratelimit_remaining::text, ratelimit_metric::text, \
CEIL(EXTRACT(EPOCH FROM (ratelimit_reset_at::timestamptz - quota.clock())))::bigint \
FROM quota.admit($1::text, $2::text, $3::text, $4::bigint, $5::bigint, $6::bigint)";

pub const SETTLE_SQL: &str = "\
SELECT settled::boolean, billed::boolean, unbilled_reason::text, cost::text, replay::boolean \
FROM quota.settle($1::text, $2::bigint, $3::bigint, $4::bigint)";

/// The batched calls (`--batch-max`): the same columns as ADMIT_SQL and SETTLE_SQL, then the
/// SQLSTATE and message of an item that the single call would have refused with an error.
pub const ADMIT_MANY_SQL: &str = "\
SELECT allowed::boolean, http_status::int, error_code::text, message::text, \
retry_after_s::bigint, key_id::bigint, user_id::bigint, channel_id::bigint, \
upstream_base_url::text, upstream_api_key::text, upstream_model::text, \
ratelimit_limit::text, ratelimit_remaining::text, ratelimit_metric::text, \
CEIL(EXTRACT(EPOCH FROM (ratelimit_reset_at::timestamptz - quota.clock())))::bigint, sqlstate::text \
FROM quota.admit_many($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) \
ORDER BY ordinal";

pub const SETTLE_MANY_SQL: &str = "\
SELECT settled::boolean, billed::boolean, unbilled_reason::text, cost::text, replay::boolean, \
sqlstate::text, message::text \
FROM quota.settle_many($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) ORDER BY ordinal";

pub const REFUND_SQL: &str = "SELECT quota.refund($1::text, $2::text)::boolean";

pub const MODELS_SQL: &str = "SELECT model::text, owned_by::text FROM quota.models($1::text)";

/// The server a pooled connection is on (`host:port`; a Unix socket shows as `local`), and
/// whether it is in recovery (a standby: it cannot take writes).
pub const HEALTH_SQL: &str = "\
SELECT coalesce(host(inet_server_addr()), 'local') || ':' || current_setting('port'), pg_is_in_recovery()";

/// Short waits: a request should not hang on a dead database, it should get 503.
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A call the database does not answer in time is busy (a dead connection errors instead).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(DbError::Busy(format!("no answer within {CALL_TIMEOUT:?}"))))
}

/// Where the database is, for messages: host, port, dbname and user, never the password.
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            #[cfg(unix)]
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    let mut out = format!(
        "host={} port={}",
        if hosts.is_empty() {
            "localhost".into()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".into()
        } else {
            ports.join(",")
        },
    );
    if let Some(db) = config.get_dbname() {
        out.push_str(&format!(" dbname={db}"));
    }
    if let Some(user) = config.get_user() {
        out.push_str(&format!(" user={user}"));
    }
    out
}

pub fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, String> {
    // The parser's messages name the offending option, not its value, so they are safe to show.
    tokio_postgres::Config::from_str(url).map_err(|e| format!("invalid database URL: {e}"))
}

/// The pool, and how its connections are protected (see `db_tls`).
pub fn build_pool(
    mut pg: tokio_postgres::Config,
    size: usize,
    tls_files: crate::db_tls::TlsFiles<'_>,
) -> Result<(Pool, DbTls), String> {
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("pg-quota-relay");
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let (manager, tls) = crate::db_tls::manager(pg, tls_files, manager_config)?;
    let pool = Pool::builder(manager)
        .max_size(size.max(1))
        // the connection used last, like PgBouncer's default: a few warm backends (CPU caches,
        // the engine's per-connection policy cache) serve a moderate load, the rest stay idle
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| format!("cannot build the connection pool: {e}"))?;
    Ok((pool, tls))
}

/// Checks that a pooled connection works and is on a server that takes writes; returns that
/// server (`host:port`). A server in recovery is unavailable: the connection is dropped from the
/// pool, so the next one is made to the host that accepts writes (`target_session_attrs`).
pub async fn ping(pool: &Pool) -> Result<String, DbError> {
    bounded(async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(HEALTH_SQL).await?;
        let row = client.query_one(&stmt, &[]).await?;
        let (server, in_recovery): (String, bool) = (row.try_get(0)?, row.try_get(1)?);
        if in_recovery {
            drop(deadpool_postgres::Object::take(client));
            return Err(DbError::Unavailable(format!("{server} is in recovery (read-only)")));
        }
        Ok(server)
    })
    .await
}

/// The tightest window, as admit or settle reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimit {
    pub metric: Option<String>,
    pub limit: Option<String>,
    pub remaining: Option<String>,
    pub reset_s: Option<i64>,
}

/// One row of quota.admit. Not `Debug`: it carries the upstream key.
pub struct Admission {
    pub allowed: bool,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub message: Option<String>,
    pub retry_after_s: Option<i64>,
    pub key_id: Option<i64>,
    pub user_id: Option<i64>,
    pub channel_id: Option<i64>,
    pub upstream_base_url: Option<String>,
    pub upstream_api_key: Option<String>,
    pub upstream_model: Option<String>,
    pub ratelimit: RateLimit,
}

/// The arguments of one admit, owned (queued for a batch).
#[derive(Clone)]
pub struct AdmitItem {
    pub api_key: String,
    pub request_id: String,
    pub model: String,
    pub est_input_tokens: i64,
    pub max_output_tokens: i64,
    pub channel_id: Option<i64>,
}

impl AdmitItem {
    pub fn args(&self) -> AdmitArgs<'_> {
        AdmitArgs {
            api_key: &self.api_key,
            request_id: &self.request_id,
            model: &self.model,
            est_input_tokens: self.est_input_tokens,
            max_output_tokens: self.max_output_tokens,
            channel_id: self.channel_id,
        }
    }
}

/// The arguments of one settle, owned (queued for a batch).
#[derive(Clone)]
pub struct SettleItem {
    pub request_id: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
}

/// The answer of a batch's item: its row, or the error the single call would have raised.
fn item_error(row: &Row, sqlstate: usize, message: usize) -> Result<Option<DbError>, DbError> {
    Ok(row.try_get::<_, Option<String>>(sqlstate)?.map(|code| DbError::Sql {
        code,
        message: row.try_get::<_, Option<String>>(message).ok().flatten().unwrap_or_default(),
    }))
}

/// Admits a batch in one transaction on `client` (quota.admit_many): one answer per item, in
/// order. Err: the whole batch failed (nothing of it committed, or its outcome is unknown).
pub async fn admit_many(
    client: deadpool_postgres::Object,
    items: &[AdmitItem],
) -> Result<Vec<Result<Admission, DbError>>, DbError> {
    bounded(async {
        let stmt = client.prepare_cached(ADMIT_MANY_SQL).await?;
        let column = |f: fn(&AdmitItem) -> String| items.iter().map(f).collect::<Vec<_>>();
        let (keys, ids, models) = (
            column(|i| i.api_key.clone()),
            column(|i| i.request_id.clone()),
            column(|i| i.model.clone()),
        );
        let est: Vec<i64> = items.iter().map(|i| i.est_input_tokens).collect();
        let max_out: Vec<i64> = items.iter().map(|i| i.max_output_tokens).collect();
        let channels: Vec<Option<i64>> = items.iter().map(|i| i.channel_id).collect();
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&keys, &ids, &models, &est, &max_out, &channels];
        let rows = match client.query(&stmt, &args).await {
            Ok(rows) => rows,
            Err(e) => return Err(dropped_if_read_only(client, e)),
        };
        if rows.len() != items.len() {
            return Err(DbError::Sql {
                code: "XX000".into(),
                message: format!("admit_many answered {} rows for {} items", rows.len(), items.len()),
            });
        }
        rows.iter()
            .map(|row| {
                Ok(match item_error(row, 15, 3)? {
                    Some(e) => Err(e),
                    None => Ok(admission_from_row(row)?),
                })
            })
            .collect()
    })
    .await
}

/// Settles a batch in one transaction on `client` (quota.settle_many); see [`admit_many`].
pub async fn settle_many(
    client: deadpool_postgres::Object,
    items: &[SettleItem],
) -> Result<Vec<Result<Settlement, DbError>>, DbError> {
    bounded(async {
        let stmt = client.prepare_cached(SETTLE_MANY_SQL).await?;
        let ids: Vec<&str> = items.iter().map(|i| i.request_id.as_str()).collect();
        let input: Vec<i64> = items.iter().map(|i| i.input_tokens).collect();
        let output: Vec<i64> = items.iter().map(|i| i.output_tokens).collect();
        let cached: Vec<i64> = items.iter().map(|i| i.cached_tokens).collect();
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&ids, &input, &output, &cached];
        let rows = match client.query(&stmt, &args).await {
            Ok(rows) => rows,
            Err(e) => return Err(dropped_if_read_only(client, e)),
        };
        if rows.len() != items.len() {
            return Err(DbError::Sql {
                code: "XX000".into(),
                message: format!("settle_many answered {} rows for {} items", rows.len(), items.len()),
            });
        }
        rows.iter()
            .map(|row| {
                Ok(match item_error(row, 5, 6)? {
                    Some(e) => Err(e),
                    None => Ok(settlement_from_row(row)?),
                })
            })
            .collect()
    })
    .await
}

pub struct AdmitArgs<'a> {
    pub api_key: &'a str,
    pub request_id: &'a str,
    pub model: &'a str,
    pub est_input_tokens: i64,
    pub max_output_tokens: i64,
    pub channel_id: Option<i64>,
}

/// An admit is run again, up to this many times in all, when it left nothing behind because
/// PostgreSQL rolled it back as a deadlock victim or a serialization failure (SQLSTATE class
/// 40; routing visits channels of equal priority in random order, so two admits can deadlock
/// there), or when its outcome is unknown: it was sent and the connection was lost or no answer
/// came in time. The engine answers a repeated admit of the same request id with the original
/// decision if the first one committed, so running it again never holds twice.
const ADMIT_ATTEMPTS: u32 = 3;

/// An admit that failed: the last attempt's error, and whether the admit may have committed
/// all the same (an attempt was sent and no answer came, and no later attempt answered), so
/// that its reservation may hold although the client is refused.
#[derive(Debug)]
pub struct AdmitFailure {
    pub error: DbError,
    pub may_have_committed: bool,
}

/// An error that was an answer, or came before anything was sent: the admit did not commit.
impl From<DbError> for AdmitFailure {
    fn from(error: DbError) -> Self {
        AdmitFailure {
            error,
            may_have_committed: false,
        }
    }
}

pub async fn admit(pool: &Pool, a: &AdmitArgs<'_>) -> Result<Admission, AdmitFailure> {
    again_when_worth_it(ADMIT_ATTEMPTS, || admit_once(pool, a)).await
}

/// An attempt that failed, and whether its call had been sent to the database.
struct Failed {
    error: DbError,
    sent: bool,
}

impl Failed {
    /// Sent, and no answer came (a lost connection, no answer in time): it may have committed.
    fn unanswered(&self) -> bool {
        self.sent && matches!(self.error, DbError::Unavailable(_) | DbError::Busy(_))
    }

    /// Run again: a conflict rolled it back, or its outcome is unknown.
    fn worth_again(&self) -> bool {
        self.error.is_conflict() || self.unanswered()
    }
}

/// Runs `call` until it ends in anything but a failure worth running again
/// ([`Failed::worth_again`]), at most `attempts` times.
async fn again_when_worth_it<T, F, Fut>(attempts: u32, mut call: F) -> Result<T, AdmitFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failed>>,
{
    let mut attempt = 1;
    let mut unanswered = false;
    loop {
        match call().await {
            Ok(t) => return Ok(t),
            Err(f) if f.worth_again() && attempt < attempts => {
                tracing::warn!(attempt, error = %f.error, "admit rolled back or its outcome unknown; running it again");
                unanswered |= f.unanswered();
                attempt += 1;
            }
            Err(f) => {
                return Err(AdmitFailure {
                    may_have_committed: unanswered || f.unanswered(),
                    error: f.error,
                })
            }
        }
    }
}

async fn admit_once(pool: &Pool, a: &AdmitArgs<'_>) -> Result<Admission, Failed> {
    let sent = std::sync::atomic::AtomicBool::new(false);
    bounded(async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(ADMIT_SQL).await?;
        sent.store(true, std::sync::atomic::Ordering::Relaxed);
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &a.api_key,
            &a.request_id,
            &a.model,
            &a.est_input_tokens,
            &a.max_output_tokens,
            &a.channel_id,
        ];
        let row = match client.query_one(&stmt, &args).await {
            Ok(row) => row,
            Err(e) => return Err(dropped_if_read_only(client, e)),
        };
        admission_from_row(&row)
    })
    .await
    .map_err(|error| Failed {
        error,
        sent: sent.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// The error of a lifecycle call; on a server that takes no writes any more (SQLSTATE 25006: a
/// demoted primary, `default_transaction_read_only`) the connection also leaves the pool, so
/// the next one is made to the host that accepts them (`target_session_attrs=read-write`).
fn dropped_if_read_only(client: deadpool_postgres::Object, e: tokio_postgres::Error) -> DbError {
    if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
        drop(deadpool_postgres::Object::take(client));
    }
    e.into()
}

fn admission_from_row(row: &Row) -> Result<Admission, DbError> {
    Ok(Admission {
        allowed: row.try_get::<_, Option<bool>>(0)?.unwrap_or(false),
        http_status: row.try_get(1)?,
        error_code: row.try_get(2)?,
        message: row.try_get(3)?,
        retry_after_s: row.try_get(4)?,
        key_id: row.try_get(5)?,
        user_id: row.try_get(6)?,
        channel_id: row.try_get(7)?,
        upstream_base_url: row.try_get(8)?,
        upstream_api_key: row.try_get(9)?,
        upstream_model: row.try_get(10)?,
        ratelimit: RateLimit {
            limit: row.try_get(11)?,
            remaining: row.try_get(12)?,
            metric: row.try_get(13)?,
            reset_s: row.try_get(14)?,
        },
    })
}

/// One row of quota.settle.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub settled: bool,
    pub billed: bool,
    pub unbilled_reason: Option<String>,
    pub cost: Option<String>,
    pub replay: bool,
}

pub async fn settle(
    pool: &Pool,
    request_id: &str,
    input_tokens: i64,
    output_tokens: i64,
    cached_tokens: i64,
) -> Result<Settlement, DbError> {
    bounded(async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(SETTLE_SQL).await?;
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&request_id, &input_tokens, &output_tokens, &cached_tokens];
        let row = match client.query_one(&stmt, &args).await {
            Ok(row) => row,
            Err(e) => return Err(dropped_if_read_only(client, e)),
        };
        settlement_from_row(&row)
    })
    .await
}

fn settlement_from_row(row: &Row) -> Result<Settlement, DbError> {
    Ok(Settlement {
        settled: row.try_get::<_, Option<bool>>(0)?.unwrap_or(false),
        billed: row.try_get::<_, Option<bool>>(1)?.unwrap_or(false),
        unbilled_reason: row.try_get(2)?,
        cost: row.try_get(3)?,
        replay: row.try_get::<_, Option<bool>>(4)?.unwrap_or(false),
    })
}

pub async fn refund(pool: &Pool, request_id: &str, reason: &str) -> Result<bool, DbError> {
    bounded(async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(REFUND_SQL).await?;
        let row = match client.query_one(&stmt, &[&request_id, &reason]).await {
            Ok(row) => row,
            Err(e) => return Err(dropped_if_read_only(client, e)),
        };
        Ok(row.try_get::<_, Option<bool>>(0)?.unwrap_or(false))
    })
    .await
}

pub struct ModelEntry {
    pub model: String,
    pub owned_by: Option<String>,
}

pub async fn models(pool: &Pool, api_key: &str) -> Result<Vec<ModelEntry>, DbError> {
    bounded(async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(MODELS_SQL).await?;
        let rows = client.query(&stmt, &[&api_key]).await?;
        rows.iter()
            .map(|r| {
                Ok(ModelEntry {
                    model: r.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
                    owned_by: r.try_get(1)?,
                })
            })
            .collect()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(code: &str) -> DbError {
        DbError::Sql {
            code: code.into(),
            message: "m".into(),
        }
    }

    fn sent(error: DbError) -> Failed {
        Failed { error, sent: true }
    }

    #[tokio::test]
    async fn a_deadlocked_admit_runs_again_and_other_errors_do_not() {
        let calls = std::cell::Cell::new(0);
        let deadlocked_twice = again_when_worth_it(3, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(sent(sql("40P01")))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(deadlocked_twice.ok(), Some(3));

        calls.set(0);
        let always = again_when_worth_it(3, || {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(sent(sql("40001"))) }
        })
        .await;
        let always = always.err().unwrap();
        assert!(always.error.is_conflict());
        assert!(!always.may_have_committed, "each attempt was rolled back");
        assert_eq!(calls.get(), 3, "gives up after the last attempt");

        for other in [
            sent(sql("PQ409")),
            sent(sql("23505")),
            sent(DbError::Forbidden {
                code: "key_disabled".into(),
                message: "x".into(),
            }),
            // not sent (no connection): nothing can have committed, the outage answers 503
            Failed {
                error: DbError::Unavailable("down".into()),
                sent: false,
            },
            Failed {
                error: DbError::Busy("pool".into()),
                sent: false,
            },
        ] {
            calls.set(0);
            let once = again_when_worth_it(3, || {
                calls.set(calls.get() + 1);
                let f = Failed {
                    error: other.error.clone(),
                    sent: other.sent,
                };
                async move { Err::<(), _>(f) }
            })
            .await;
            assert!(!once.unwrap_err().may_have_committed, "{} answered", other.error);
            assert_eq!(calls.get(), 1, "{} is not run again", other.error);
        }
    }

    #[tokio::test]
    async fn an_admit_sent_without_an_answer_runs_again() {
        for lost in [DbError::Unavailable("connection closed".into()), DbError::Busy("no answer".into())] {
            let calls = std::cell::Cell::new(0);
            let answered = again_when_worth_it(3, || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                let f = sent(lost.clone());
                async move { if n < 2 { Err(f) } else { Ok(n) } }
            })
            .await;
            assert_eq!(answered.ok(), Some(2), "{lost} is run again");
        }
    }

    #[tokio::test]
    async fn an_admit_left_unanswered_until_the_attempts_run_out_may_have_committed() {
        // sent and the connection lost, then the database cannot be reached: a 503 for the
        // client, and a reservation that may hold
        let calls = std::cell::Cell::new(0);
        let failed = again_when_worth_it(3, || {
            calls.set(calls.get() + 1);
            let f = Failed {
                error: DbError::Unavailable("connection closed".into()),
                sent: calls.get() == 1,
            };
            async move { Err::<(), _>(f) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls.get(), 2, "run again once, then the database is away");
        assert!(matches!(failed.error, DbError::Unavailable(_)));
        assert!(failed.may_have_committed);
        // unanswered on every attempt
        let failed = again_when_worth_it(3, || async { Err::<(), _>(sent(DbError::Busy("no answer".into()))) })
            .await
            .unwrap_err();
        assert!(failed.may_have_committed);
    }

    #[test]
    fn target_description_never_contains_the_password() {
        let cfg = parse_database_url("postgres://relay:s3cret@db.example:6543/quota").unwrap();
        let d = describe_target(&cfg);
        assert_eq!(d, "host=db.example port=6543 dbname=quota user=relay");
        let cfg = parse_database_url("host=/run/pg port=5433 user=r password=s3cret").unwrap();
        assert!(!describe_target(&cfg).contains("s3cret"));
    }
}
