//! Optional background worker that runs `quota.sweep()` every `pg_quota.sweep_interval`, then
//! the ledger's upkeep (`quota.maintain_ledger()`).
//! It exists only when the library is in `shared_preload_libraries`; otherwise schedule the
//! sweep with pg_cron (see the README). On a standby it does not run until a promotion.
use crate::gucs::{SWEEP_DATABASE, SWEEP_INTERVAL_S};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

pub fn register() {
    // SAFETY: a plain global read; true only while the postmaster loads preload libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new("pg_quota sweeper")
        .set_function("pg_quota_sweeper_main")
        .set_library("pg_quota")
        .enable_spi_access()
        // Not on a standby: sweeping writes. The postmaster starts it when recovery ends, so a
        // promoted standby sweeps without a restart (tests/sweeper.rs).
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_quota_sweeper_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("pg_quota sweeper started in database {database}");

    while BackgroundWorker::wait_latch(Some(interval())) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if SWEEP_INTERVAL_S.get() == 0 {
            continue;
        }
        BackgroundWorker::transaction(sweep_once);
        if !MISSING.load(std::sync::atomic::Ordering::Relaxed) {
            BackgroundWorker::transaction(maintain_ledger_once);
        }
    }
    // Stopped by SIGTERM. At shutdown that is the end; otherwise (pg_terminate_backend, or
    // DROP DATABASE ... WITH (FORCE) of its database) the postmaster must start it again after
    // the restart time, which it does only for a non-zero exit code: 0 would unregister it and
    // end sweeping until the server restarts.
    // SAFETY: proc_exit is how a background worker ends; nothing of ours is left to drop.
    unsafe { pg_sys::proc_exit(1) }
}

/// pg_quota.sweep_database (default postgres).
fn database() -> String {
    SWEEP_DATABASE
        .get()
        .and_then(|db| db.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| "postgres".to_owned())
}

fn interval() -> Duration {
    // Disabled (0) still wakes once a minute to notice a SIGHUP that re-enables it.
    Duration::from_secs(match SWEEP_INTERVAL_S.get() {
        0 => 60,
        s => s as u64,
    })
}

/// Whether the last sweep found the extension missing (so that it is said once, not each time).
static MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn sweep_once() {
    use std::sync::atomic::Ordering;
    let installed =
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_quota')")
            == Ok(Some(true));
    if MISSING.swap(!installed, Ordering::Relaxed) == installed {
        let database = database();
        if installed {
            log!("pg_quota sweeper: the extension is now installed in database {database}; sweeping");
        } else {
            warning!("pg_quota sweeper: the extension is not installed in database {database}, nothing to sweep; run CREATE EXTENSION pg_quota there or set pg_quota.sweep_database");
        }
    }
    if !installed {
        return;
    }
    let counts = counts(
        "SELECT expired_reservations::bigint, resumed_keys::bigint, recovered_windows::bigint, \
         pruned_buckets::bigint, pruned_released::bigint, pruned_events::bigint FROM quota.sweep()",
    );
    if let Some([expired, resumed, recovered, buckets, released, events]) = counts.as_deref() {
        if counts.iter().flatten().any(|n| *n > 0) {
            let expired_action = match crate::gucs::EXPIRED_RESERVATIONS.get() {
                crate::gucs::ExpiredReservations::Charge => "charged at their reservation",
                crate::gucs::ExpiredReservations::Release => "released",
            };
            log!(
                "pg_quota sweep: {expired} stale reservations expired ({expired_action}), {resumed} keys resumed, \
                 {recovered} spent windows recovered; pruned {buckets} rolling buckets, {released} records \
                 of released reservations and {events} events"
            );
        }
    }
}

/// The ledger's upkeep (quota.maintain_ledger), in a transaction of its own after the sweep:
/// its DDL takes locks on the ledger that the sweep's transaction should not hold.
fn maintain_ledger_once() {
    let counts = counts(
        "SELECT made_partitions::bigint, filed_rows, closed_partitions::bigint, archived_partitions::bigint, \
         forgotten_request_ids FROM quota.maintain_ledger()",
    );
    if let Some([made, filed, closed, archived, forgotten]) = counts.as_deref() {
        if *made + *filed + *closed + *archived > 0 {
            log!(
                "pg_quota ledger upkeep: {made} partitions made, {filed} rows filed from the default partition, \
                 {closed} partitions closed, {archived} archived; {forgotten} request ids forgotten"
            );
        }
    }
}

/// The one row of bigint counts that `query` returns (NULLs as 0); None when it fails.
fn counts(query: &str) -> Option<Vec<i64>> {
    Spi::connect(|client| {
        let row = client.select(query, None, &[])?.first();
        (1..=row.columns()?)
            .map(|i| row.get::<i64>(i).map(Option::unwrap_or_default))
            .collect::<Result<Vec<i64>, _>>()
    })
    .ok()
}
