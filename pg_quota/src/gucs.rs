//! Every GUC the extension defines, in one place.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

/// When set, the engine's clock reads this timestamptz instead of `now()`. Superuser only,
/// so a client cannot move its own windows.
pub static FAKE_NOW: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Reservations older than this are expired by quota.sweep() (charged or released, as
/// pg_quota.expired_reservations says): a crashed relay's leftovers, a lost settle.
pub static RESERVATION_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(600);

/// Rows of quota.released (refunds, expired reservations) older than this are deleted by
/// quota.sweep(); 0 keeps them for ever.
pub static RELEASED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);

/// Events (quota.event) older than this are deleted by quota.sweep(); 0 keeps them for ever.
pub static EVENT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// What admit does with a model that has no price (quota.price_for finds none).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnpricedModels {
    /// admitted, settled unbilled (price_not_found), logged once a day per model
    #[name = c"allow"]
    Allow,
    /// refused (400 model_not_priced) for keys that a cost policy applies to
    #[name = c"refuse"]
    Refuse,
}

pub static UNPRICED_MODELS: GucSetting<UnpricedModels> = GucSetting::<UnpricedModels>::new(UnpricedModels::Allow);

/// What quota.sweep() does with a reservation older than pg_quota.reservation_ttl.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExpiredReservations {
    /// charged at its reservation, like a settle of the estimate (a late settle corrects it)
    #[name = c"charge"]
    Charge,
    /// its holds given back uncharged
    #[name = c"release"]
    Release,
}

pub static EXPIRED_RESERVATIONS: GucSetting<ExpiredReservations> =
    GucSetting::<ExpiredReservations>::new(ExpiredReservations::Charge);

/// How the ledger is partitioned by quota.maintain_ledger (sql/schema/70_ledger.sql).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum LedgerPartition {
    /// one partition per UTC day
    #[name = c"day"]
    Day,
    /// one partition per week, from Monday 00:00 UTC
    #[name = c"week"]
    Week,
    /// partitions are the DBA's (or pg_partman's); quota.maintain_ledger makes none
    #[name = c"manual"]
    Manual,
}

pub static LEDGER_PARTITION: GucSetting<LedgerPartition> = GucSetting::<LedgerPartition>::new(LedgerPartition::Day);

/// Ledger partitions older than this leave the ledger (quota.archive_ledger); 0 keeps them.
pub static LEDGER_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Where partitions past the retention go; empty drops them.
pub static LEDGER_ARCHIVE_SCHEMA: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How long after its ledger row (beyond pg_quota.reservation_ttl) a request id stays known.
pub static REQUEST_ID_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);

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
        c"Age after which quota.sweep() expires a reservation that was never settled (see pg_quota.expired_reservations).",
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
        c"The record keeps refunds idempotent and lets a late settle charge a released reservation; \
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
    GucRegistry::define_enum_guc(
        c"pg_quota.unpriced_models",
        c"What quota.admit does with a model that has no price: allow (unbilled, logged) or refuse.",
        c"refuse answers 400 model_not_priced to keys that an enabled cost policy (or the chosen \
          channel's cost cap) applies to; other keys pass, unbilled.",
        &UNPRICED_MODELS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_quota.expired_reservations",
        c"What quota.sweep() does with a reservation older than pg_quota.reservation_ttl: charge or release.",
        c"charge bills it at its reservation (estimated input plus max output) and a late settle \
          corrects it to the measured usage; release gives the holds back uncharged.",
        &EXPIRED_RESERVATIONS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_quota.ledger_partition",
        c"Length of a ledger partition that quota.maintain_ledger makes: day, week, or manual (none).",
        c"Partitions are made a week ahead; a row no partition takes goes to quota.usage_ledger_default \
          and is filed into a partition by the next upkeep.",
        &LEDGER_PARTITION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_quota.ledger_retention",
        c"Age after which quota.maintain_ledger takes a ledger partition out of the ledger (0 = never).",
        c"The partition's sums stay in quota.ledger_checkpoint, its rollups in quota.usage_daily; the \
          partition is dropped, or moved into pg_quota.ledger_archive_schema when that is set.",
        &LEDGER_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_quota.ledger_archive_schema",
        c"Schema into which quota.maintain_ledger moves partitions past pg_quota.ledger_retention (empty = drop them).",
        c"An archived partition is an ordinary table: COPY it or pg_dump it, then DROP TABLE it.",
        &LEDGER_ARCHIVE_SCHEMA,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_quota.request_id_retention",
        c"How long after its settle (beyond pg_quota.reservation_ttl) a request id stays known.",
        c"While known, a repeated settle or refund is recognised and admit refuses the id; afterwards \
          quota.maintain_ledger forgets it. quota.ledger_request holds rate x this many rows.",
        &REQUEST_ID_RETENTION_S,
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
