//! SQL entry points over the pgrx-free window math in `pg_quota_core`.
use chrono::{DateTime, Utc};
use pg_quota_core::{approx_duration as words, WindowSpec};
use pgrx::prelude::*;

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub(crate) fn to_utc(ts: TimestampWithTimeZone) -> DateTime<Utc> {
    if !ts.is_finite() {
        error!("pg_quota: window math needs finite timestamps, got {ts}");
    }
    DateTime::from_timestamp_micros(ts.into_inner() + PG_EPOCH_OFFSET_US)
        .unwrap_or_else(|| error!("pg_quota: timestamp {ts} is out of range"))
}

pub(crate) fn to_pg(ts: DateTime<Utc>) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(ts.timestamp_micros() - PG_EPOCH_OFFSET_US)
        .unwrap_or_else(|_| error!("pg_quota: timestamp {ts} is out of range"))
}

/// A policy's window rules from its columns; an invalid column is SQLSTATE 23514.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spec(
    period: &str,
    period_minutes: Option<i32>,
    window_mode: &str,
    anchor: TimestampWithTimeZone,
    time_zone: &str,
    week_start: i32,
    reset_hour: i32,
) -> WindowSpec {
    WindowSpec::from_columns(
        period,
        period_minutes,
        window_mode,
        to_utc(anchor),
        time_zone,
        week_start,
        reset_hour,
    )
    .unwrap_or_else(|e| {
        ereport!(ERROR, PgSqlErrorCode::ERRCODE_CHECK_VIOLATION, e.to_string());
    })
}

/// The window of a policy that contains `at`: [window_start, window_end). window_end is NULL
/// for `total` windows, which never end. Rolling windows end one bucket (minute) after `at`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(immutable, parallel_safe)]
pub(crate) fn window_bounds(
    period: &str,
    period_minutes: Option<i32>,
    window_mode: &str,
    anchor: TimestampWithTimeZone,
    time_zone: &str,
    week_start: i32,
    reset_hour: i32,
    at: TimestampWithTimeZone,
) -> TableIterator<
    'static,
    (
        name!(window_start, TimestampWithTimeZone),
        name!(window_end, Option<TimestampWithTimeZone>),
    ),
> {
    let spec = spec(period, period_minutes, window_mode, anchor, time_zone, week_start, reset_hour);
    TableIterator::once(bounds(&spec, to_utc(at)))
}

/// The window of `spec` containing `at`: its start and its end (None for `total`).
pub(crate) fn bounds(spec: &WindowSpec, at: DateTime<Utc>) -> (TimestampWithTimeZone, Option<TimestampWithTimeZone>) {
    let w = spec.window_at(at);
    (to_pg(w.start), w.end.map(to_pg))
}

/// NULL when the window columns of a policy are valid, else {column, message}.
#[pg_extern(immutable, parallel_safe)]
pub(crate) fn policy_window_problem(
    period: &str,
    period_minutes: Option<i32>,
    window_mode: &str,
    time_zone: &str,
    week_start: i32,
    reset_hour: i32,
) -> Option<Vec<String>> {
    let anchor = DateTime::<Utc>::UNIX_EPOCH;
    WindowSpec::from_columns(period, period_minutes, window_mode, anchor, time_zone, week_start, reset_hour)
        .err()
        .map(|e| vec![e.field.to_string(), e.to_string()])
}

/// The one-minute bucket of a rolling window that usage at `at` counts in (`quota.rolling_usage`).
/// No SQL function since 0.2.0 (the sweep's charge counts by settle's code); kept in the library
/// for a 0.1.0 schema that it serves until ALTER EXTENSION UPDATE (its sweep calls it).
#[pg_extern(immutable, parallel_safe, strict, sql = false)]
pub(crate) fn minute_bucket(at: TimestampWithTimeZone) -> TimestampWithTimeZone {
    to_pg(WindowSpec::bucket_of(to_utc(at)))
}

/// An approximate duration in words ("about 3 hours"), for messages that must not leak amounts.
#[pg_extern(immutable, parallel_safe, strict)]
pub(crate) fn approx_duration(seconds: i64) -> String {
    words(seconds)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn day_window_in_new_york_on_the_23_hour_day() {
        let hours = Spi::get_one::<i32>(
            "SELECT (extract(epoch FROM window_end - window_start) / 3600)::int \
             FROM quota.window_bounds('day', NULL, 'fixed', '2026-01-01', 'America/New_York', 1, 0, \
                                      '2026-03-08 12:00:00-04')",
        );
        assert_eq!(hours, Ok(Some(23)));
    }

    #[pg_test(error = "invalid policy: time_zone: unknown time zone 'Mars/Olympus'; use an IANA time zone name such as 'UTC', 'Europe/Berlin' or 'America/New_York'")]
    fn unknown_time_zone_is_refused() {
        Spi::run(
            "SELECT * FROM quota.window_bounds('day', NULL, 'fixed', now(), 'Mars/Olympus', 1, 0, now())",
        )
        .unwrap();
    }
}
