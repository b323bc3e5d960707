//! `quota.admit_many` and `quota.settle_many`: many lifecycle calls in one transaction, one
//! commit for the whole batch. `quota.admit` and `quota.settle` are batches of one.
//!
//! Items are decided in array order by the single-call code ([`admit_item`], [`settle_item`]),
//! each seeing the holds and usage of the items before it, so a batch's answers are those of
//! the same calls made one by one in that order. Before the first item, a batch of more than
//! one locks every counter its items will touch, once, in the global lock order
//! (`pg_quota_core::batch::lock_plan`): two batches (or a batch and a single call) sharing
//! counters queue on the first of them instead of deadlocking, whatever the order of their
//! items, and a hot key's counter is locked once per batch. (A batch of one needs no such step:
//! the single-call path already locks in that order.) What an item locks besides counters is
//! its own (its reservation, its ledger row), except a day's rollup row and, when a window is
//! found spent, the key row; those come after the counters, as in a single call.
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

use super::admit::{admit_item, AdmitItem, Admission};
use super::cache;
use super::settle::{settle_item, SettleItem, Settlement};
use super::{clock, col, fail, run, EngineError, Policy};

// Locks counters in the order given (the lock order), creating those that do not exist yet in
// the window given; an existing counter is locked, not changed (ON CONFLICT … WHERE false
// locks the row and updates nothing), so rolling its window stays the items' business.
const LOCK_COUNTERS: &str = "\
INSERT INTO quota.counter AS c (policy_id, scope_id, window_start)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (policy_id, scope_id) DO UPDATE SET reserved = c.reserved WHERE false";

// The keys of a batch's secrets, by the item's ordinal (an unknown secret has no row).
const KEYS: &str = "\
SELECT s.i, k.key_id, k.user_id
FROM unnest($1::text[]) WITH ORDINALITY AS s(secret, i), LATERAL quota.key_for_secret(s.secret) k";

// The enabled channels serving a model: routing may pick any of them.
const MODEL_CHANNELS: &str = "\
SELECT cm.channel_id FROM quota.channel_model cm JOIN quota.channel c ON c.channel_id = cm.channel_id
WHERE cm.model = $1 AND c.status = 'enabled'";

// The reservations of a batch's settles, locked (in request id order: the reservation row comes
// first in the lock order), with the holds their settles will move.
const RESERVATIONS: &str = "\
SELECT r.hold_policy, r.hold_scope FROM quota.reservation r
WHERE r.request_id = ANY($1) ORDER BY r.request_id FOR UPDATE";

/// Locks the counters, each once, in the lock order; `counters` may name one many times.
fn lock_counters(client: &mut SpiClient<'_>, counters: Vec<(CounterRef, TimestampWithTimeZone)>) {
    let plan = lock_plan(counters);
    if plan.is_empty() {
        return;
    }
    let args = [
        plan.iter().map(|(c, _)| c.policy_id).collect::<Vec<_>>().into(),
        plan.iter().map(|(c, _)| c.scope_id).collect::<Vec<_>>().into(),
        plan.iter().map(|(_, ws)| *ws).collect::<Vec<_>>().into(),
    ];
    run(client, LOCK_COUNTERS, &args);
}

/// A policy's counter for a scope, and the window a counter created now starts in.
fn counter_now(policy: &Policy, scope_id: i64, now: chrono::DateTime<chrono::Utc>) -> (CounterRef, TimestampWithTimeZone) {
    let (ws, _) = policy.window(now);
    let counter = CounterRef {
        channel: policy.subject_type == "channel",
        policy_id: policy.policy_id,
        scope_id,
    };
    (counter, policy.counter_window(ws))
}

/// Admits each item in order (see the module comment); one answer per item.
pub(super) fn admit_each(client: &mut SpiClient<'_>, items: &[AdmitItem<'_>]) -> Vec<Result<Admission, EngineError>> {
    if items.len() > 1 {
        lock_for_admits(client, items);
    }
    let repeated = repeats(items.iter().map(|i| i.request_id));
    items
        .iter()
        .zip(repeated)
        .map(|(item, repeated)| {
            if repeated {
                let id = item.request_id.unwrap_or_default();
                return fail(b"PQ409", format!("admit: request_id {id} was already used in this batch"));
            }
            admit_item(client, item)
        })
        .collect()
}

/// Locks the counters the admits may touch: each key's and user's policies for the model, and
/// the caps of every channel that routing may pick (the pinned one, or all enabled ones serving
/// the model). Only reads otherwise; an item that is refused early simply does not use them.
fn lock_for_admits(client: &mut SpiClient<'_>, items: &[AdmitItem<'_>]) {
    let (now, now_utc) = clock();
    cache::refresh(client);
    let secrets: Vec<Option<String>> = items.iter().map(|i| i.api_key.map(String::from)).collect();
    let mut owner: Vec<Option<(i64, i64)>> = vec![None; items.len()];
    for r in run(client, KEYS, &[secrets.into()]) {
        let i = usize::try_from(col::<i64>(&r, 1).unwrap() - 1).unwrap_or(usize::MAX);
        if let Some(o) = owner.get_mut(i) {
            *o = Some((col(&r, 2).unwrap(), col(&r, 3).unwrap()));
        }
    }
    let mut counters: Vec<(CounterRef, TimestampWithTimeZone)> = Vec::new();
    let mut channels_of: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    let mut seen_subjects = std::collections::HashSet::new();
    for (item, owner) in items.iter().zip(owner) {
        let Some(model) = item.model else { continue };
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
            None => channels_of
                .entry(model.to_string())
                .or_insert_with(|| {
                    run(client, MODEL_CHANNELS, &[model.into()])
                        .map(|r| col::<i64>(&r, 1).unwrap())
                        .collect()
                })
                .clone(),
        };
        for channel in candidates {
            for a in cache::policies_for(client, (None, None, None, Some(channel)), now) {
                counters.push(counter_now(&a.policy, a.scope_id, now_utc));
            }
        }
    }
    lock_counters(client, counters);
}

/// Settles each item in order (see the module comment); one answer per item.
pub(super) fn settle_each(client: &mut SpiClient<'_>, items: &[SettleItem<'_>]) -> Vec<Result<Settlement, EngineError>> {
    if items.len() > 1 {
        lock_for_settles(client, items);
    }
    items.iter().map(|item| settle_item(client, item)).collect()
}

/// Locks the reservations being settled, then the counters they hold, each once, in the lock
/// order. (A request the sweep expired has no reservation: its late settle locks the counters
/// of the policies that apply now itself, as a single call does.)
fn lock_for_settles(client: &mut SpiClient<'_>, items: &[SettleItem<'_>]) {
    let (_, now_utc) = clock();
    let ids: Vec<Option<String>> = items.iter().map(|i| i.request_id.map(String::from)).collect();
    let holds: Vec<(Vec<i64>, Vec<i64>)> = run(client, RESERVATIONS, &[ids.into()])
        .map(|r| (col(&r, 1).unwrap_or_default(), col(&r, 2).unwrap_or_default()))
        .collect();
    if holds.is_empty() {
        return;
    }
    cache::refresh(client);
    let mut counters: Vec<(CounterRef, TimestampWithTimeZone)> = Vec::new();
    for (policies, scopes) in holds {
        for (policy, scope_id) in cache::policies_by_id(client, &policies).into_iter().zip(scopes) {
            // a policy deleted meanwhile took its counter with it
            if let Some(policy) = policy {
                counters.push(counter_now(&policy, scope_id, now_utc));
            }
        }
    }
    lock_counters(client, counters);
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

type SettleRow = (
    i32,
    bool,
    Option<bool>,
    Option<String>,
    Option<AnyNumeric>,
    Option<bool>,
    Option<String>,
    Option<String>,
);

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
    let (ids, input, output) = (
        request_ids.unwrap_or_default(),
        input_tokens.unwrap_or_default(),
        output_tokens.unwrap_or_default(),
    );
    let items: Vec<SettleItem> = (0..n)
        .map(|i| SettleItem {
            request_id: ids[i].as_deref(),
            input_tokens: input[i],
            output_tokens: output[i],
            cached_tokens: cached_tokens.as_ref().map_or(Some(0), |c| c[i]),
        })
        .collect();
    let settled = Spi::connect_mut(|client| settle_each(client, &items));
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
