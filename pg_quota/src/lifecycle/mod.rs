//! The request lifecycle's hot path: `quota.admit` and `quota.settle`, in Rust over SPI.
//!
//! Each call is a handful of simple statements whose plans are prepared once per backend and
//! kept (`SPI_keepplan`), and the logic between them is native code. PL/pgSQL re-initialises
//! every expression it evaluates in each new transaction, and every lifecycle call is a new
//! transaction: that, not the statements, was most of a PL/pgSQL admit's time.
//!
//! The rules stay in one place each: policy selection is `quota.policies_for` (SQL), the
//! window math is `pg_quota_core` (shared with `quota.window_bounds`), and the rules the SQL
//! helpers also need, [`refuses`], [`metric_amount`] and [`key_refusal`], are SQL functions
//! implemented here. The SQL declarations of the entry points, with their SECURITY DEFINER and
//! pinned search_path, live in `sql/schema/40_lifecycle.sql`.
//!
//! Lock order, as everywhere in the engine: the reservation row, the counters (the channel's
//! first, then by policy_id: `quota.lock_order`), the day's rollup row (settle only), then the
//! api_key row. Rows that no other request shares (reservation, ledger) are written before the
//! counters, so a busy key's counter rows stay locked only from their update to the commit.
/// The select list that [`Policy::read`] reads (14 columns), for a `quota.policy` row `p`.
/// The columns added after 0.1.0 (enforce, alert_at) are read through `to_jsonb(p)`, with
/// their defaults when missing: this library also serves a database still at 0.1.0, between
/// its installation and `ALTER EXTENSION pg_quota UPDATE` (policy rows are cached per backend,
/// so this costs only on a cache miss).
macro_rules! policy_columns {
    () => {
        "p.policy_id, p.subject_type, p.metric, p.window_mode, p.boundary, p.exclusive, \
         p.period, p.period_minutes, p.anchor, p.time_zone, p.week_start, p.reset_hour, \
         coalesce((to_jsonb(p) ->> 'enforce')::boolean, true), \
         CASE WHEN jsonb_typeof(to_jsonb(p) -> 'alert_at') = 'array' \
              THEN ARRAY(SELECT a::numeric FROM jsonb_array_elements_text(to_jsonb(p) -> 'alert_at') a) END"
    };
}

/// The SET list of a counter upsert (`quota.counter AS c`) that moves the counter to the
/// window starting at `EXCLUDED.window_start`: a stale window starts over (no usage), then
/// `EXCLUDED.used` is added (0 unless the statement inserts usage). `reserved` is left to the
/// statement, and `reset_at` as it is: the last clearing stays before any row of the new window
/// (and a rolling counter, whose window never rolls, keeps it). So is a spent mark: one from
/// before the new window is the ended window's, for [`recover_window`] to log and clear.
macro_rules! roll_window {
    () => {
        "used         = CASE WHEN c.window_start = EXCLUDED.window_start THEN c.used ELSE 0 END + EXCLUDED.used,
        window_start = EXCLUDED.window_start"
    };
}

/// The RETURNING columns of a counter upsert that say how its window stands marked: spent
/// (marked in this window), and ended spent (marked in a window that has ended since).
macro_rules! marks {
    () => {
        "coalesce(c.exhausted_at >= c.window_start, false), coalesce(c.exhausted_at < c.window_start, false)"
    };
}

mod admit;
mod alerts;
mod batch;
mod cache;
mod settle;

use std::cell::RefCell;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use pg_quota_core::WindowSpec;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData, SpiTupleTable};
use pgrx::{AnyNumeric, PgOid, PgTupleDesc};

use crate::window::to_utc;

thread_local! {
    /// Kept plans by statement text (each statement is a `'static` string, so its address is
    /// its identity). Plans are revalidated by PostgreSQL after DDL, like any cached plan.
    static PLANS: RefCell<HashMap<usize, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs one of the lifecycle's statements with its kept plan, preparing it on first use with
/// the argument types of this call (pass typed NULLs, `DatumWithOid::null::<T>()`).
pub(crate) fn run<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
) -> SpiTupleTable<'conn> {
    let key = sql.as_ptr() as usize;
    let missing = PLANS.with(|plans| !plans.borrow().contains_key(&key));
    if missing {
        let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
        let plan = client
            .prepare_mut(sql, &types)
            .unwrap_or_else(|e| spi_failed(sql, e))
            .keep();
        PLANS.with(|plans| plans.borrow_mut().insert(key, plan));
    }
    PLANS.with(|plans| {
        let plans = plans.borrow();
        let plan = &plans[&key];
        client.update(plan, None, args).unwrap_or_else(|e| spi_failed(sql, e))
    })
}

fn spi_failed(sql: &str, e: pgrx::spi::SpiError) -> ! {
    error!("pg_quota: statement failed ({e}): {sql}")
}

/// The first row of a statement's result, if any.
pub(crate) fn first<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
) -> Option<SpiHeapTupleData<'conn>> {
    run(client, sql, args).next()
}

/// Rows whose arrays travel flat (a batch's holds: one array per column for all its rows):
/// each row's slice `[lo:hi]` (1-based, inclusive; empty when hi < lo), given the rows' lengths.
pub(crate) fn slices(lengths: impl Iterator<Item = usize>) -> (Vec<i32>, Vec<i32>) {
    let (mut lo, mut hi) = (Vec::new(), Vec::new());
    let mut next = 1;
    for len in lengths {
        lo.push(next);
        next += i32::try_from(len).expect("a request counts on few policies");
        hi.push(next - 1);
    }
    (lo, hi)
}

/// A column of a row (1-based), NULL as `None`.
pub(crate) fn col<T: FromDatum + IntoDatum>(row: &SpiHeapTupleData<'_>, ordinal: usize) -> Option<T> {
    row.get::<T>(ordinal)
        .unwrap_or_else(|e| error!("pg_quota: column {ordinal}: {e}"))
}

/// A refused call with one of the engine's own SQLSTATEs (PQ400 bad input, PQ404 unknown,
/// PQ409 conflict), which the relay maps to HTTP statuses.
pub(crate) struct EngineError {
    sqlstate: &'static [u8; 5],
    message: String,
}

pub(crate) fn fail<T>(sqlstate: &'static [u8; 5], message: String) -> Result<T, EngineError> {
    Err(EngineError { sqlstate, message })
}

impl EngineError {
    /// Raises the error. pgrx knows only the standard SQLSTATEs, so a code of our own is raised
    /// here, directly: call it last, from the entry point, once SPI is finished and no Rust
    /// value of the call is left to drop (only plain frames lie between here and PostgreSQL's
    /// error handler, which the transaction's abort then cleans up after).
    pub(crate) fn raise(self) -> ! {
        unsafe extern "C-unwind" {
            fn errstart(elevel: std::ffi::c_int, domain: *const std::ffi::c_char) -> bool;
            fn errcode(sqlerrcode: std::ffi::c_int) -> std::ffi::c_int;
            fn errmsg(fmt: *const std::ffi::c_char, ...) -> std::ffi::c_int;
            fn errfinish(filename: *const std::ffi::c_char, lineno: std::ffi::c_int, funcname: *const std::ffi::c_char);
        }
        // MAKE_SQLSTATE: six bits a character, first character lowest
        let code = self
            .sqlstate
            .iter()
            .enumerate()
            .fold(0, |acc, (i, ch)| acc | ((i32::from(*ch) - 48) & 0x3F) << (6 * i));
        let message = std::ffi::CString::new(self.message.replace('\0', "")).unwrap_or_default();
        // SAFETY: the err* calls are PostgreSQL's error API, used as ereport() uses it; errmsg
        // copies the message before `message` is dropped; errfinish does not return at ERROR.
        unsafe {
            if errstart(pgrx::PgLogLevel::ERROR as _, std::ptr::null()) {
                errcode(code);
                errmsg(c"%s".as_ptr(), message.as_ptr());
            }
            drop(message);
            errfinish(c"lifecycle".as_ptr(), 0, c"pg_quota".as_ptr());
        }
        unreachable!("errfinish returned at ERROR")
    }
}

/// A value of composite type `quota.<type_name>` from its columns, in order. The type is found
/// by two catalog-cache lookups, not by parsing its name (which cost 3 % of a call).
pub(crate) fn row<const N: usize>(
    type_name: &'static std::ffi::CStr,
    columns: [Option<pg_sys::Datum>; N],
) -> PgHeapTuple<'static, pgrx::AllocatedByRust> {
    // SAFETY: catalog lookups by name, as TypenameGetTypid does them; both names outlive them.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(c"quota".as_ptr(), false);
        pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as _,
            pg_sys::Anum_pg_type_oid as _,
            pg_sys::Datum::from(type_name.as_ptr()),
            pg_sys::Datum::from(schema),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    let tupdesc = PgTupleDesc::for_composite_type_by_oid(oid)
        .unwrap_or_else(|| error!("pg_quota: no composite type quota.{type_name:?}"));
    // SAFETY: the datums were made by IntoDatum for the types of the columns, in order.
    unsafe { PgHeapTuple::from_datums(tupdesc, columns) }
        .unwrap_or_else(|e| error!("pg_quota: a value of quota.{type_name:?}: {e}"))
}

/// The lifecycle's clock (`quota.clock()`), in both forms.
pub(crate) fn clock() -> (TimestampWithTimeZone, DateTime<Utc>) {
    let now = crate::clock::clock();
    (now, to_utc(now))
}

/// The columns of a policy the lifecycle needs, as `policy_columns!()` lists them.
#[derive(Clone)]
pub(crate) struct Policy {
    pub policy_id: i64,
    pub subject_type: String,
    pub metric: String,
    pub window_mode: String,
    pub boundary: String,
    pub exclusive: bool,
    pub spec: WindowSpec,
    /// false: shadow mode (counted, never refuses or suspends: see [`alerts`])
    pub enforce: bool,
    /// alert thresholds, fractions of the effective limit (empty: none)
    pub alert_at: Vec<AnyNumeric>,
}

impl Policy {
    /// Reads `policy_columns!()` starting at column `first`.
    pub(crate) fn read(row: &SpiHeapTupleData<'_>, first: usize) -> Policy {
        let text = |i: usize| col::<String>(row, first + i).unwrap_or_default();
        let window_mode = text(3);
        let spec = crate::window::spec(
            &text(6),
            col::<i32>(row, first + 7),
            &window_mode,
            col(row, first + 8).expect("policy.anchor is NOT NULL"),
            &text(9),
            i32::from(col::<i16>(row, first + 10).unwrap_or(1)),
            i32::from(col::<i16>(row, first + 11).unwrap_or(0)),
        );
        Policy {
            policy_id: col(row, first).expect("policy_id is NOT NULL"),
            subject_type: text(1),
            metric: text(2),
            window_mode,
            boundary: text(4),
            exclusive: col(row, first + 5).unwrap_or(false),
            spec,
            enforce: col(row, first + 12).unwrap_or(true),
            alert_at: col(row, first + 13).unwrap_or_default(),
        }
    }

    /// Its counter for a scope, as the lock order sees it.
    pub(crate) fn counter(&self, scope_id: i64) -> pg_quota_core::batch::CounterRef {
        pg_quota_core::batch::CounterRef {
            channel: self.subject_type == "channel",
            policy_id: self.policy_id,
            scope_id,
        }
    }

    pub(crate) fn rolling(&self) -> bool {
        self.window_mode == "rolling"
    }

    /// The window containing `at`: its start and its end (NULL for `total`).
    pub(crate) fn window(&self, at: DateTime<Utc>) -> (TimestampWithTimeZone, Option<TimestampWithTimeZone>) {
        crate::window::bounds(&self.spec, at)
    }

    /// The window a counter of this policy keeps for the window starting at `window_start`
    /// (`quota.counter.window_start`). A rolling window's start moves every minute, but its
    /// usage lives in `quota.rolling_usage`, so its counter never rolls (-infinity): its spent
    /// mark and its last reset stay until the window is no longer spent or is reset.
    pub(crate) fn counter_window(&self, window_start: TimestampWithTimeZone) -> TimestampWithTimeZone {
        if self.rolling() {
            TimestampWithTimeZone::negative_infinity()
        } else {
            window_start
        }
    }
}

const ROLLING_USED: &str = "\
SELECT coalesce(sum(r.used), 0) FROM quota.rolling_usage r
WHERE r.policy_id = $1 AND r.scope_id = $2 AND r.bucket >= $3";

/// Settled usage of a policy's window starting at `ws` for a scope, given the counter's usage in
/// it (`counter_used`: 0 when the counter holds another window): a rolling window's is the sum of
/// its buckets instead. The same rule as `quota.window_used` in SQL.
pub(crate) fn window_used(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    ws: TimestampWithTimeZone,
    counter_used: AnyNumeric,
) -> AnyNumeric {
    if policy.rolling() {
        rolling_used(client, policy.policy_id, scope_id, ws)
    } else {
        counter_used
    }
}

/// Settled usage of a rolling window starting at `window_start`: the sum of its buckets.
pub(crate) fn rolling_used(
    client: &mut SpiClient<'_>,
    policy_id: i64,
    scope_id: i64,
    window_start: TimestampWithTimeZone,
) -> AnyNumeric {
    first(
        client,
        ROLLING_USED,
        &[policy_id.into(), scope_id.into(), window_start.into()],
    )
    .and_then(|r| col(&r, 1))
    .unwrap_or_else(|| AnyNumeric::from(0))
}

const MARK_EXHAUSTED: &str = "\
SELECT quota.mark_exhausted(p, $2, $3, $4, $5, $6, $7) FROM quota.policy p WHERE p.policy_id = $1";

/// A policy's window [ws, we) for a scope was found spent and not yet marked so: marks it, logs
/// it and applies the policy's on_exhausted (quota.mark_exhausted) for the request's key.
pub(crate) fn mark_exhausted(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    (key_id, user_id): (i64, i64),
    (ws, we): (TimestampWithTimeZone, Option<TimestampWithTimeZone>),
    now: TimestampWithTimeZone,
) {
    let args = [
        policy.policy_id.into(),
        scope_id.into(),
        key_id.into(),
        user_id.into(),
        ws.into(),
        we.into(),
        now.into(),
    ];
    run(client, MARK_EXHAUSTED, &args);
}

const RECOVER_WINDOW: &str = "SELECT quota.recover_window($1, $2, $3, $4, $5, $6, $7)";

/// Why a window found spent is not any more.
#[derive(Clone, Copy)]
pub(crate) enum Recovered {
    /// it has ended: the counter has rolled to the policy's window starting then (marks from
    /// before its counter window are the ended window's)
    WindowReset(TimestampWithTimeZone),
    /// it has room again (a boost, a rolling window's usage ageing out)
    WindowNotSpent,
}

/// Clears the spent mark of a policy's window for a scope and logs its recovery, found by a
/// request of the key (quota.recover_window). The counter row is locked already.
pub(crate) fn recover_window(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    (key_id, user_id): (i64, i64),
    why: Recovered,
    now: TimestampWithTimeZone,
) {
    let (marked_before, by) = match why {
        Recovered::WindowReset(ws) => (policy.counter_window(ws), "window_reset"),
        Recovered::WindowNotSpent => (TimestampWithTimeZone::positive_infinity(), "window_not_spent"),
    };
    let args = [
        policy.policy_id.into(),
        scope_id.into(),
        key_id.into(),
        user_id.into(),
        marked_before.into(),
        now.into(),
        by.into(),
    ];
    run(client, RECOVER_WINDOW, &args);
}

/// Why a key may not be used now (a 403): its error code and message; None when it may. The one
/// rule admit and quota.models share.
pub(crate) fn key_refused(
    key_enabled: bool,
    user_enabled: bool,
    expires_at: Option<TimestampWithTimeZone>,
    now: TimestampWithTimeZone,
) -> Option<(&'static str, &'static str)> {
    if !key_enabled {
        Some(("key_disabled", "This API key has been disabled."))
    } else if !user_enabled {
        Some(("user_disabled", "The user that owns this API key has been disabled."))
    } else if expires_at.is_some_and(|e| e.into_inner() <= now.into_inner()) {
        Some(("key_expired", "This API key has expired."))
    } else {
        None
    }
}

/// [`key_refused`] for SQL: no row when the key may be used.
#[pg_extern(immutable, parallel_safe)]
pub(crate) fn key_refusal(
    key_enabled: bool,
    user_enabled: bool,
    expires_at: Option<TimestampWithTimeZone>,
    now_ts: TimestampWithTimeZone,
) -> TableIterator<'static, (name!(error_code, &'static str), name!(message, &'static str))> {
    TableIterator::new(key_refused(key_enabled, user_enabled, expires_at, now_ts))
}

/// Whether a policy's window refuses a request of `amount`: exhausted, or (strict) the
/// request would overshoot. The one rule admit, routing and status share.
#[pg_extern(immutable, parallel_safe, strict)]
pub(crate) fn refuses(
    boundary: &str,
    effective_limit: AnyNumeric,
    used: AnyNumeric,
    reserved: AnyNumeric,
    amount: AnyNumeric,
) -> bool {
    used >= effective_limit || (boundary == "strict" && used + reserved + amount > effective_limit)
}

/// The amount a policy counts for a usage: money (NULL when unpriced), raw tokens, or one
/// request.
#[pg_extern(immutable, parallel_safe)]
pub(crate) fn metric_amount(
    metric: &str,
    cost: Option<AnyNumeric>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
) -> Option<AnyNumeric> {
    match metric {
        "cost" => cost,
        "tokens" => Some(AnyNumeric::from(input_tokens? + output_tokens?)),
        _ => Some(AnyNumeric::from(1)),
    }
}
