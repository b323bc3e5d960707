//! The relay's shared state: the pool, the HTTP client, the configuration, the metrics and
//! the lifecycle tasks that shutdown waits for.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::config::RelayConfig;
use crate::fail_open::FailOpen;
use crate::metrics::Metrics;
use crate::proxy::batcher::Batcher;
use crate::proxy::journal::Journal;

pub struct Relay {
    pub pool: Pool,
    pub http: reqwest::Client,
    pub config: RelayConfig,
    pub metrics: Metrics,
    /// Lifecycle tasks (admit → forward → settle); shutdown waits for them.
    pub tasks: TaskTracker,
    /// Large bodies parsed and estimated at once on the blocking pool: one per core.
    pub estimators: Semaphore,
    /// `--fail-open`: which keys may pass while the database is unreachable.
    pub fail_open: FailOpen,
    /// Settlements not yet recorded, kept past a restart with `--state-dir`.
    pub journal: Journal,
    /// Admits and settlements coalesced into batches (`--batch-max`).
    pub batcher: Batcher,
}

pub type AppState = Arc<Relay>;

impl Relay {
    pub fn new(
        pool: Pool,
        config: RelayConfig,
        journal: Journal,
    ) -> Result<AppState, reqwest::Error> {
        // https upstreams go through rustls, trusting the system's store, the built-in public
        // roots and --upstream-ca-file
        let mut http = reqwest::Client::builder();
        for ca in &config.upstream_ca {
            http = http.add_root_certificate(ca.clone());
        }
        let http = http
            .connect_timeout(Duration::from_secs(10))
            .timeout(config.upstream_timeout)
            // the relay talks to its upstreams directly; an ambient HTTP_PROXY must not
            // reroute (or see) upstream keys
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let fail_open = FailOpen::new(config.fail_open.clone());
        let batcher = Batcher::new(pool.clone(), config.batch_max);
        Ok(Arc::new(Relay {
            pool,
            http,
            config,
            metrics: Metrics::new(),
            tasks: TaskTracker::new(),
            fail_open,
            journal,
            batcher,
            estimators: Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            ),
        }))
    }
}

pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

/// A relay whose database refuses connections (nothing listens on port 1).
#[cfg(test)]
pub(crate) fn test_relay(
    fail_open: bool,
    upstream_url: Option<String>,
    upstream_timeout: Duration,
) -> AppState {
    let pg =
        crate::db::parse_database_url("host=127.0.0.1 port=1 user=relay dbname=quota").unwrap();
    let (pool, _) = crate::db::build_pool(pg, 2, Default::default()).unwrap();
    Relay::new(
        pool,
        RelayConfig {
            upstream_url,
            upstream_api_key: Some("sk-upstream-test".into()),
            upstream_ca: vec![],
            max_body_bytes: 1024,
            default_max_output_tokens: 1024,
            fail_open: crate::config::FailOpenConfig {
                enabled: fail_open,
                recent: Duration::from_secs(900),
                max_requests: 1000,
                max_outage: Duration::from_secs(300),
            },
            forward_headers: vec![],
            upstream_timeout,
            settle_retry: Duration::from_secs(1),
            batch_max: crate::proxy::batcher::DEFAULT_BATCH_MAX,
        },
        Journal::open(None).unwrap(),
    )
    .unwrap()
}
