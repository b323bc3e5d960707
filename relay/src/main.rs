//! pg-quota-relay: an OpenAI-compatible relay that calls pg_quota's `quota.admit` before and
//! `quota.settle` / `quota.refund` after every forwarded request; plus `mock-upstream`, a fake
//! OpenAI upstream for demos and tests; and `notify`, which delivers pg_quota's events to webhooks.
//!
//! The servers print exactly one line on stdout once their socket is bound
//! (`pg-quota-relay listening on http://IP:PORT` / `mock-upstream listening on http://IP:PORT`),
//! and `notify` once it listens for events (`pg-quota-relay notify listening on pg_quota_event
//! (notifier NAME)`); logs go to stderr.

mod app;
mod config;
mod db;
mod db_tls;
mod error;
mod estimate;
mod fail_open;
mod metrics;
mod mock;
mod notify;
mod openai;
mod proxy;
mod server;
mod state;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::config::{Cli, Command, RelayConfig, ServeArgs};
use crate::error::DbError;
use crate::server::{announce, shutdown_signal};

/// Exit code for "the database cannot be reached" and invalid configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pg-quota-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::MockUpstream(args) => runtime.block_on(mock::run(args)),
        Command::Notify(args) => runtime.block_on(notify::run(args)),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("pg-quota-relay: {msg}");
        ExitCode::from(EXIT_CONFIG)
    };
    let config = match RelayConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let pg = match db::parse_database_url(&args.database.database_url) {
        Ok(pg) => pg,
        Err(e) => return fail(e),
    };
    let target = db::describe_target(&pg);
    let tls_files = args.database.tls_files();
    let (pool, db_tls) = match db::build_pool(pg, args.pool_size, tls_files) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // fail fast: one connection and SELECT 1 before listening
    match tokio::time::timeout(Duration::from_secs(15), db::ping(&pool)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let cause = match e {
                DbError::Unavailable(c) => c,
                other => other.to_string(),
            };
            return fail(format!("cannot reach the database at {target}: {cause}"));
        }
        Err(_) => {
            return fail(format!(
                "cannot reach the database at {target}: no answer within 15 s"
            ))
        }
    }
    check_contract(&pool).await;
    if config.upstream_url.is_none() {
        tracing::warn!(
            "--upstream-url is not set: requests whose channel names no upstream will get 502"
        );
    }
    if config.fail_open.enabled {
        tracing::warn!(
            recent_s = config.fail_open.recent.as_secs(),
            max_requests = config.fail_open.max_requests,
            max_s = config.fail_open.max_outage.as_secs(),
            "--fail-open: while the database cannot be connected to, keys admitted recently are forwarded WITHOUT quota accounting, within a budget per outage"
        );
    }
    // the BPE tables take a moment to load; do it before the first request needs them
    tokio::task::spawn_blocking(estimate::Tokenizer::warm_up);

    let journal = match proxy::journal::Journal::open(args.state_dir.as_deref()) {
        Ok(j) => j,
        Err(e) => return fail(e),
    };
    let state = match state::Relay::new(pool.clone(), config, journal) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot build the HTTP client: {e}")),
    };
    match proxy::settlement::replay_journal(&state) {
        Ok(0) => {}
        Ok(replayed) => tracing::info!(
            replayed,
            "replaying settlements journaled at the last shutdown"
        ),
        Err(e) => return fail(format!("--state-dir: {e}")),
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pg-quota-relay: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    tracing::info!(%addr, database = %target, database_tls = %db_tls, pool_size = args.pool_size, "relay started");
    announce(&format!("pg-quota-relay listening on http://{addr}"));

    let served = axum::serve(listener, app::app(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    if let Err(e) = &served {
        tracing::error!(error = %e, "server error");
    }

    state.tasks.close();
    let pending = state.tasks.len();
    if pending > 0 {
        tracing::info!(pending, "waiting for in-flight settlements");
    }
    let grace = Duration::from_secs(args.shutdown_grace_s);
    if tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::error!(
            still_running = state.tasks.len(),
            settlements_pending = state.journal.pending(),
            "shutdown grace period over with requests or settlements still running"
        );
    }
    // what the database has not recorded yet goes to the journal, for the next start
    let pending = state.journal.pending();
    match state.journal.write_pending() {
        Ok(0) if pending > 0 => tracing::error!(
            pending,
            "settlements not recorded and no --state-dir: quota.sweep() will release their reservations"
        ),
        Ok(0) => {}
        Ok(written) => tracing::warn!(written, "settlements not recorded yet: journaled for the next start"),
        Err(e) => tracing::error!(error = %e, pending, "could not write the settlement journal"),
    }
    pool.close();
    tracing::info!("relay stopped");
    if served.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Warn (do not fail: the engine may be installed later) when the lifecycle functions are
/// missing from the database.
async fn check_contract(pool: &deadpool_postgres::Pool) {
    const SQL: &str =
        "SELECT array_agg(f) FROM unnest(ARRAY['admit','settle','refund','models']) f \
        WHERE NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
        WHERE n.nspname = 'quota' AND p.proname = f)";
    let Ok(client) = pool.get().await else { return };
    match client.query_one(SQL, &[]).await {
        Ok(row) => {
            if let Ok(Some(missing)) = row.try_get::<_, Option<Vec<String>>>(0) {
                tracing::warn!(
                    ?missing,
                    "pg_quota functions missing from the database (CREATE EXTENSION pg_quota?)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not check for the pg_quota functions"),
    }
}
