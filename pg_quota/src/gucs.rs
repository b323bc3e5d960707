//! Every GUC the extension defines, in one place.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// When set, the engine's clock reads this timestamptz instead of `now()`. Superuser only,
/// so a client cannot move its own windows.
pub static FAKE_NOW: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Reservations older than this are released by quota.sweep(): a crashed relay's leftovers.
pub static RESERVATION_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(600);

/// Rows of quota.released (refunds, expired reservations) older than this are deleted by
/// quota.sweep(); 0 keeps them for ever.
pub static RELEASED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);

/// Events (quota.event) older than this are deleted by quota.sweep(); 0 keeps them for ever.
pub static EVENT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Seconds between two sweeps of the background worker; 0 turns it off.
pub static SWEEP_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(60);

/// The database whose quota.sweep() the background worker runs; read when the worker starts.
/// SIGHUP rather than POSTMASTER context: a POSTMASTER GUC cannot be defined when the library
/// is loaded by CREATE EXTENSION instead of shared_preload_libraries.
pub static SWEEP_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn register() {
    GucRegistry::define_int_guc(
        c"pg_quota.sweep_interval",
        c"Seconds between two runs of quota.sweep() by the background worker (0 = off).",
        c"The worker exists only when pg_quota is in shared_preload_libraries.",
        &SWEEP_INTERVAL_S,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_quota.sweep_database",
        c"Database in which the background worker runs quota.sweep().",
        c"Set it in postgresql.conf next to shared_preload_libraries.",
        &SWEEP_DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_quota.reservation_ttl",
        c"Age after which quota.sweep() releases a reservation that was never settled.",
        c"Longer than the slowest upstream request you allow; the relay's own timeout is shorter.",
        &RESERVATION_TTL_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_quota.released_retention",
        c"Age after which quota.sweep() deletes the record of a refunded or expired reservation (0 = never).",
        c"The record keeps refunds idempotent and lets a late settle charge an expired reservation; \
          keep it well beyond the relay's settle retry window.",
        &RELEASED_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_quota.event_retention",
        c"Age after which quota.sweep() deletes an event of quota.event (0 = never).",
        c"Events are the audit trail of exhaustion, recovery, suspension, resets and policy changes.",
        &EVENT_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_quota.fake_now",
        c"Timestamp the quota engine uses as the current time (tests only).",
        c"Empty means the real transaction time, now(). Every window computation reads the \
          clock through quota.clock(), which honours this setting.",
        &FAKE_NOW,
        GucContext::Suset,
        GucFlags::default(),
    );
}
