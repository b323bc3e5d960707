//! `quota.admit_many` and `quota.settle_many`: many lifecycle calls in one transaction, one
//! commit for the whole batch. `quota.admit` and `quota.settle` are batches of one.
//!
//! Items are decided in array order, each seeing the holds and usage of the items before it,
//! so a batch's answers are those of the same calls made one by one in that order; the writes
//! are set-based, a handful of statements per batch whatever its size.
//!
//! * **Admit** ([`admit_each`]): one statement reads every item's key (`admit::read_keys`); the
//!   reservations of the items that look simply admissible are filed ahead
//!   (`admit::file_ahead`); then the batch locks every counter its items may touch, once, in
//!   the global lock order (`pg_quota_core::batch::lock_plan`), and reads them. Two batches (or
//!   a batch and a single call) sharing counters queue on the first of them instead of
//!   deadlocking, whatever the order of their items, and a hot key's counter is locked once per
//!   batch. Each item is then decided in memory by the single call's rules
//!   (`admit::decide_locked`, routing included), and one statement writes the holds, the
//!   reservations not filed ahead and the removal of those filed ahead but refused
//!   (`admit::file`). An item that needs more than a hold (a suspension, a pinned channel's
//!   grant, a window to mark or recover, a shadow refusal, a retry) runs the single call's path
//!   ([`admit_item`]) once what came before it is written, and the batch reads its keys and
//!   counters again.
//! * **Settle** (`settle::settle_all`): one statement takes every reservation; one writes all
//!   ledger rows and each counter once, with the batch's sums, in the lock order; thresholds,
//!   spent marks and recoveries are then walked item by item.
//!
//! What an item locks besides counters is its own (its reservation, its ledger row), except a
//! day's rollup row and, when a window is found spent, the key row; those come after the
//! counters, as in a single call.
//!
//! An item's bad input (missing or out-of-bounds arguments, a request id already used or named
//! by an earlier item of an admit batch, an unknown or refunded request id at settle) is that
//! item's answer: its SQLSTATE and message, as the single call would have raised them. An
//! error that PostgreSQL raises (a deadlock, a serialization failure, a lost connection) aborts
//! the whole batch: the caller runs its items again (the relay, one by one).
use pg_quota_core::batch::{lock_plan, repeats, CounterRef};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::admit::{
    admit_item, checked, decide_locked, file, file_ahead, filing_ahead, read_keys, routes_for, Admission, AdmitItem,
    Checked, Filing, KeyRow, Locally, Locked, LockedCounters, Pending, Routes,
};
use super::cache;
use super::settle::{settle_all, SettleItem};
use super::{clock, col, fail, run, EngineError, Policy};

// Locks counters in the order given (the lock order), creating those that do not exist yet in
// the window given; an existing counter is locked, not changed (ON CONFLICT … WHERE false
// locks the row and updates nothing), so rolling its window stays the items' business.
const LOCK_COUNTERS: &str = "\
INSERT INTO quota.counter AS c (policy_id, scope_id, window_start)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (policy_id, scope_id) DO UPDATE SET reserved = c.reserved WHERE false";

/// Locks the counters, each once, in the lock order; `counters` may name one many times.
fn lock_counters(client: &mut SpiClient<'_>, counters: Vec<(CounterRef, TimestampWithTimeZone)>) -> Vec<CounterRef> {
    let plan = lock_plan(counters);
    if plan.is_empty() {
        return vec![];
    }
    let args = [
        plan.iter().map(|(c, _)| c.policy_id).collect::<Vec<_>>().into(),
        plan.iter().map(|(c, _)| c.scope_id).collect::<Vec<_>>().into(),
        plan.iter().map(|(_, ws)| *ws).collect::<Vec<_>>().into(),
    ];
    run(client, LOCK_COUNTERS, &args);
    plan.into_iter().map(|(c, _)| c).collect()
}

/// A policy's counter for a scope, and the window a counter created now starts in.
fn counter_now(
    policy: &Policy,
    scope_id: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> (CounterRef, TimestampWithTimeZone) {
    let (ws, _) = policy.window(now);
    (policy.counter(scope_id), policy.counter_window(ws))
}

/// Admits each item in order (see the module comment); one answer per item.
pub(super) fn admit_each(client: &mut SpiClient<'_>, items: &[AdmitItem<'_>]) -> Vec<Result<Admission, EngineError>> {
    if items.len() == 1 {
        return vec![admit_item(client, &items[0])];
    }
    let (now, now_utc) = clock();
    let mut keys = read_keys(client, items);
    let repeated = repeats(items.iter().map(|i| i.request_id));
    let mut answers: Vec<Option<Result<Admission, EngineError>>> = (0..items.len()).map(|_| None).collect();
    let mut args: Vec<Option<Checked>> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        args.push(if repeated[i] {
            let id = item.request_id.unwrap_or_default();
            answers[i] = Some(fail(b"PQ409", format!("admit: request_id {id} was already used in this batch")));
            None
        } else {
            checked(item).map_err(|e| answers[i] = Some(Err(e))).ok()
        });
    }
    // the reservations of the items that look simply admissible go in before any counter is
    // locked (admit::file_ahead)
    let mut ahead: Vec<Filing> = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if let (Some(a), None) = (a, items[i].channel_id) {
            ahead.extend(filing_ahead(client, i, a, keys.get(&i), now));
        }
    }
    let mut ahead = file_ahead(client, ahead, now);
    let mut routes = Routes::new();
    let locked = lock_for_admits(client, items, &keys, &mut routes, now, now_utc);
    let mut counters = read_counters(client, &locked);
    let mut pending = Pending::default();
    let mut singles: std::collections::HashSet<(i64, &str)> = std::collections::HashSet::new();
    // whether `keys` and `counters` still hold: an item on the single path writes to both
    let mut fresh = true;
    for (i, item) in items.iter().enumerate() {
        let Some(args) = &args[i] else { continue };
        // A pinned channel, or a key and model that went the single path before in this batch
        // (what sent it there most likely holds still), go that path at once: the batch does not
        // read again for them. (A key's id and user never change: `keys` still names them.)
        let subject = keys.get(&i).map(|k| (k.key_id, args.model));
        let single = item.channel_id.is_some() || subject.is_some_and(|s| singles.contains(&s));
        if !fresh && !single {
            keys = read_keys(client, &items[i..]).into_iter().map(|(j, k)| (i + j, k)).collect();
            counters = read_counters(client, &locked);
            fresh = true;
        }
        let decided = if single {
            Locally::Single
        } else {
            decide_locked(client, i, args, item.channel_id, keys.get(&i), &mut counters, &mut routes, now)
        };
        match (decided, ahead.remove(&i)) {
            (Locally::Admitted(answer, filing), Some(filed)) if filing.same(&filed) => {
                answers[i] = Some(Ok(answer));
                pending.held.push(filed);
            }
            (Locally::Admitted(answer, filing), None) => {
                answers[i] = Some(Ok(answer));
                pending.file.push(filing);
            }
            (Locally::Answered(answer), filed) => {
                answers[i] = Some(answer);
                pending.unfile.extend(filed.map(|f| f.request_id));
            }
            // the single call's path (or, rarely, holds other than those filed ahead: a policy
            // changed meanwhile), once what came before is written and its own filing removed
            (_, filed) => {
                singles.extend(subject);
                pending.unfile.extend(filed.map(|f| f.request_id));
                write(client, std::mem::take(&mut pending), items, &mut answers, now);
                answers[i] = Some(admit_item(client, item));
                fresh = false;
            }
        }
    }
    write(client, pending, items, &mut answers, now);
    answers.into_iter().map(|a| a.expect("every item is answered")).collect()
}

/// Writes what the batch decided (admit::file); an admitted request whose request id a
/// concurrent admit filed first is answered by the single call's path after all (a retry).
fn write(
    client: &mut SpiClient<'_>,
    pending: Pending,
    items: &[AdmitItem<'_>],
    answers: &mut [Option<Result<Admission, EngineError>>],
    now: TimestampWithTimeZone,
) {
    for i in file(client, pending, now) {
        answers[i] = Some(admit_item(client, &items[i]));
    }
}

// The counters a batch locked, as they are now (locked: nobody else changes them), each looked
// up by key (see KEYS in admit.rs).
const COUNTERS: &str = "\
SELECT c.policy_id, c.scope_id, c.window_start, c.used, c.reserved, c.exhausted_at
FROM unnest($1::bigint[], $2::bigint[]) AS h(policy_id, scope_id)
JOIN LATERAL (SELECT * FROM quota.counter c WHERE c.policy_id = h.policy_id AND c.scope_id = h.scope_id LIMIT 1) c
     ON true";

fn read_counters(client: &mut SpiClient<'_>, locked: &[CounterRef]) -> LockedCounters {
    let args = [
        locked.iter().map(|c| c.policy_id).collect::<Vec<_>>().into(),
        locked.iter().map(|c| c.scope_id).collect::<Vec<_>>().into(),
    ];
    run(client, COUNTERS, &args)
        .map(|r| {
            let counter = Locked {
                window_start: col(&r, 3).unwrap(),
                used: col(&r, 4).unwrap(),
                reserved: col(&r, 5).unwrap(),
                exhausted_at: col(&r, 6),
                rolling_used: None,
            };
            ((col(&r, 1).unwrap(), col(&r, 2).unwrap()), counter)
        })
        .collect()
}

/// Locks the counters the admits may touch: each key's and user's policies for the model, and
/// the caps of every channel that routing may pick (the pinned one, or all enabled ones serving
/// the model). Only reads otherwise; an item that is refused early simply does not use them.
/// Returns the counters locked, in the lock order.
fn lock_for_admits(
    client: &mut SpiClient<'_>,
    items: &[AdmitItem<'_>],
    keys: &std::collections::HashMap<usize, KeyRow>,
    routes: &mut Routes,
    now: TimestampWithTimeZone,
    now_utc: chrono::DateTime<chrono::Utc>,
) -> Vec<CounterRef> {
    let mut counters: Vec<(CounterRef, TimestampWithTimeZone)> = Vec::new();
    let mut seen_subjects = std::collections::HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Some(model) = item.model else { continue };
        let owner = keys.get(&i).map(|k| (k.key_id, k.user_id));
        if let Some((key_id, user_id)) = owner.filter(|(k, _)| seen_subjects.insert((*k, model.to_string()))) {
            for a in cache::policies_for(client, (Some(key_id), Some(user_id), Some(model.to_string()), None), now) {
                counters.push(counter_now(&a.policy, a.scope_id, now_utc));
            }
        }
        if !cache::channels(client, model).capped {
            continue;
        }
        let candidates = match item.channel_id {
            Some(pinned) => vec![pinned],
            None => routes_for(client, routes, model).iter().filter(|r| r.enabled).map(|r| r.channel_id).collect(),
        };
        for channel in candidates {
            for a in cache::policies_for(client, (None, None, None, Some(channel)), now) {
                counters.push(counter_now(&a.policy, a.scope_id, now_utc));
            }
        }
    }
    lock_counters(client, counters)
}

/// The HTTP status of an item refused with one of the engine's SQLSTATEs (as the relay maps a
/// single call's error).
fn http_status(e: &EngineError) -> i32 {
    match e.sqlstate {
        b"PQ400" => 400,
        b"PQ404" => 404,
        b"PQ409" => 409,
        _ => 500,
    }
}

fn sqlstate(e: &EngineError) -> String {
    String::from_utf8_lossy(e.sqlstate).into_owned()
}

/// The items of a batch call, checked to be arrays of one length (a malformed call is refused
/// whole: PQ400).
fn item_count(name: &str, lengths: &[(&str, Option<usize>)]) -> Result<usize, EngineError> {
    let n = lengths[0].1.unwrap_or(0);
    for (arg, len) in lengths {
        match len {
            Some(l) if *l == n => {}
            Some(_) => return fail(b"PQ400", format!("{name}: {arg} must have as many elements as {}", lengths[0].0)),
            None => return fail(b"PQ400", format!("{name}: {arg} is required")),
        }
    }
    Ok(n)
}

type AdmitRow = (
    i32,
    bool,
    i32,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<AnyNumeric>,
    Option<AnyNumeric>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    Option<String>,
);

#[pg_extern(sql = false)] // declared in sql/schema/45_batch.sql
#[allow(clippy::type_complexity)]
fn admit_many(
    api_keys: Option<Vec<Option<String>>>,
    request_ids: Option<Vec<Option<String>>>,
    models: Option<Vec<Option<String>>>,
    est_input_tokens: Option<Vec<Option<i64>>>,
    max_output_tokens: Option<Vec<Option<i64>>>,
    channel_ids: Option<Vec<Option<i64>>>,
) -> TableIterator<
    'static,
    (
        name!(ordinal, i32),
        name!(allowed, bool),
        name!(http_status, i32),
        name!(error_code, Option<String>),
        name!(message, Option<String>),
        name!(retry_after_s, Option<i32>),
        name!(key_id, Option<i64>),
        name!(user_id, Option<i64>),
        name!(channel_id, Option<i64>),
        name!(upstream_base_url, Option<String>),
        name!(upstream_api_key, Option<String>),
        name!(upstream_model, Option<String>),
        name!(ratelimit_limit, Option<AnyNumeric>),
        name!(ratelimit_remaining, Option<AnyNumeric>),
        name!(ratelimit_metric, Option<String>),
        name!(ratelimit_reset_at, Option<TimestampWithTimeZone>),
        name!(sqlstate, Option<String>),
    ),
> {
    let n = item_count(
        "admit_many",
        &[
            ("api_keys", api_keys.as_ref().map(Vec::len)),
            ("request_ids", request_ids.as_ref().map(Vec::len)),
            ("models", models.as_ref().map(Vec::len)),
            ("est_input_tokens", est_input_tokens.as_ref().map(Vec::len)),
            ("max_output_tokens", max_output_tokens.as_ref().map(Vec::len)),
            ("channel_ids", Some(channel_ids.as_ref().map_or(request_ids.as_ref().map_or(0, Vec::len), Vec::len))),
        ],
    );
    let n = match n {
        Ok(n) => n,
        Err(e) => e.raise(),
    };
    let (keys, ids, models, est, max_out) = (
        api_keys.unwrap_or_default(),
        request_ids.unwrap_or_default(),
        models.unwrap_or_default(),
        est_input_tokens.unwrap_or_default(),
        max_output_tokens.unwrap_or_default(),
    );
    let items: Vec<AdmitItem> = (0..n)
        .map(|i| AdmitItem {
            api_key: keys[i].as_deref(),
            request_id: ids[i].as_deref(),
            model: models[i].as_deref(),
            est_input_tokens: est[i],
            max_output_tokens: max_out[i],
            channel_id: channel_ids.as_ref().and_then(|c| c[i]),
        })
        .collect();
    let decisions = Spi::connect_mut(|client| admit_each(client, &items));
    let rows: Vec<AdmitRow> = decisions
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let ordinal = i32::try_from(i + 1).unwrap_or(i32::MAX);
            match d {
                Ok(a) => (
                    ordinal,
                    a.allowed,
                    a.http_status,
                    a.error_code.map(String::from),
                    a.message,
                    a.retry_after_s,
                    a.key_id,
                    a.user_id,
                    a.channel_id,
                    a.upstream_base_url,
                    a.upstream_api_key,
                    a.upstream_model,
                    a.ratelimit_limit,
                    a.ratelimit_remaining,
                    a.ratelimit_metric,
                    a.ratelimit_reset_at,
                    None,
                ),
                Err(e) => (
                    ordinal,
                    false,
                    http_status(&e),
                    None,
                    Some(e.message.clone()),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(sqlstate(&e)),
                ),
            }
        })
        .collect();
    TableIterator::new(rows)
}

type SettleRow =
    (i32, bool, Option<bool>, Option<String>, Option<AnyNumeric>, Option<bool>, Option<String>, Option<String>);

#[pg_extern(sql = false)] // declared in sql/schema/45_batch.sql
#[allow(clippy::type_complexity)]
fn settle_many(
    request_ids: Option<Vec<Option<String>>>,
    input_tokens: Option<Vec<Option<i64>>>,
    output_tokens: Option<Vec<Option<i64>>>,
    cached_tokens: Option<Vec<Option<i64>>>,
) -> TableIterator<
    'static,
    (
        name!(ordinal, i32),
        name!(settled, bool),
        name!(billed, Option<bool>),
        name!(unbilled_reason, Option<String>),
        name!(cost, Option<AnyNumeric>),
        name!(replay, Option<bool>),
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let n = item_count(
        "settle_many",
        &[
            ("request_ids", request_ids.as_ref().map(Vec::len)),
            ("input_tokens", input_tokens.as_ref().map(Vec::len)),
            ("output_tokens", output_tokens.as_ref().map(Vec::len)),
            ("cached_tokens", Some(cached_tokens.as_ref().map_or(request_ids.as_ref().map_or(0, Vec::len), Vec::len))),
        ],
    );
    let n = match n {
        Ok(n) => n,
        Err(e) => e.raise(),
    };
    let (ids, input, output) =
        (request_ids.unwrap_or_default(), input_tokens.unwrap_or_default(), output_tokens.unwrap_or_default());
    let items: Vec<SettleItem> = (0..n)
        .map(|i| SettleItem {
            request_id: ids[i].as_deref(),
            input_tokens: input[i],
            output_tokens: output[i],
            cached_tokens: cached_tokens.as_ref().map_or(Some(0), |c| c[i]),
        })
        .collect();
    let settled = Spi::connect_mut(|client| settle_all(client, &items));
    let rows: Vec<SettleRow> = settled
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let ordinal = i32::try_from(i + 1).unwrap_or(i32::MAX);
            match s {
                Ok(s) => (ordinal, true, Some(s.billed), s.unbilled_reason, Some(s.cost), Some(s.replay), None, None),
                Err(e) => (ordinal, false, None, None, None, None, Some(sqlstate(&e)), Some(e.message.clone())),
            }
        })
        .collect();
    TableIterator::new(rows)
}
