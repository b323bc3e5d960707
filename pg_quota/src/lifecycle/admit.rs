//! `quota.admit`: authenticate, route to a channel, then check and reserve the estimate on every
//! policy the request counts on, all or nothing, in the caller's transaction. A request that
//! its own limits refuse (a window spent, or an estimate that would overshoot a strict one) is
//! refused before routing, without locking a channel's counters.
use pg_quota_core::approx_duration;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::alerts;
use super::cache::{self, Applicable};
use super::{
    clock, col, fail, first, key_refused, mark_exhausted, metric_amount, recover_window, refuses, row, run, slices,
    window_used, EngineError, Policy, Recovered,
};
use crate::gucs::{UnpricedModels, UNPRICED_MODELS};

/// The columns of `quota.admission`, in order.
#[derive(Default)]
pub(super) struct Admission {
    pub allowed: bool,
    pub http_status: i32,
    pub error_code: Option<&'static str>,
    pub message: Option<String>,
    pub retry_after_s: Option<i32>,
    pub key_id: Option<i64>,
    pub user_id: Option<i64>,
    pub channel_id: Option<i64>,
    pub upstream_base_url: Option<String>,
    pub upstream_api_key: Option<String>,
    pub upstream_model: Option<String>,
    pub ratelimit_limit: Option<AnyNumeric>,
    pub ratelimit_remaining: Option<AnyNumeric>,
    pub ratelimit_metric: Option<String>,
    pub ratelimit_reset_at: Option<TimestampWithTimeZone>,
}

impl Admission {
    fn denied(http_status: i32, error_code: &'static str, message: String) -> Admission {
        Admission { http_status, error_code: Some(error_code), message: Some(message), ..Default::default() }
    }

    /// A 429 with the time until `frees` (None or infinity: never) in seconds and in words.
    fn refusal(
        error_code: &'static str,
        what: String,
        frees: Option<TimestampWithTimeZone>,
        now: TimestampWithTimeZone,
        recovery: &Recovery,
    ) -> Admission {
        let retry = frees.filter(|f| f.is_finite()).map(|f| seconds_until(f, now).max(1));
        let message = match retry {
            Some(s) => format!("{what} {} {}.", recovery.soon, approx_duration(i64::from(s))),
            None => format!("{what} {}", recovery.never),
        };
        Admission { retry_after_s: retry, ..Admission::denied(429, error_code, message) }
    }

    /// Fills the rate-limit fields of a 429 from the limit that refused: nothing remains of it
    /// until it frees up (infinity: never, no reset time).
    fn exhausted_limit(self, limit: AnyNumeric, metric: &str, frees: Option<TimestampWithTimeZone>) -> Admission {
        Admission {
            ratelimit_limit: Some(limit),
            ratelimit_remaining: Some(AnyNumeric::from(0)),
            ratelimit_metric: Some(metric.to_string()),
            ratelimit_reset_at: frees.filter(|f| f.is_finite()),
            ..self
        }
    }

    fn into_tuple(self) -> pgrx::composite_type!('static, "quota.admission") {
        row(
            c"admission",
            [
                self.allowed.into_datum(),
                self.http_status.into_datum(),
                self.error_code.into_datum(),
                self.message.into_datum(),
                self.retry_after_s.into_datum(),
                self.key_id.into_datum(),
                self.user_id.into_datum(),
                self.channel_id.into_datum(),
                self.upstream_base_url.into_datum(),
                self.upstream_api_key.into_datum(),
                self.upstream_model.into_datum(),
                self.ratelimit_limit.into_datum(),
                self.ratelimit_remaining.into_datum(),
                self.ratelimit_metric.into_datum(),
                self.ratelimit_reset_at.into_datum(),
            ],
        )
    }
}

/// How a 429's message ends: when what refused frees up, and when it never does.
struct Recovery {
    soon: &'static str,
    never: &'static str,
}

/// A window that refused: it frees up at its reset.
const RESETS: Recovery = Recovery { soon: "It resets in", never: "It does not reset." };

/// A key suspended by a run-out policy: it resumes when that window frees up.
const RESUMES: Recovery =
    Recovery { soon: "It resumes in", never: "It does not resume by itself; ask an administrator." };

/// Whole seconds from `now` to `until`, rounded up.
fn seconds_until(until: TimestampWithTimeZone, now: TimestampWithTimeZone) -> i32 {
    let us = until.into_inner() - now.into_inner();
    i32::try_from(us.div_euclid(1_000_000) + i64::from(us.rem_euclid(1_000_000) > 0)).unwrap_or(i32::MAX)
}

/// One limit: the policies of one axis with the same model group, metric, period and window
/// kind (see quota.policies_for). It admits a request when any of its policies does.
struct Limit {
    key: String,
    ok: bool,
    effective_limit: AnyNumeric,
    metric: String,
    /// the roomiest admitting policy: what is left after this request, and its window's end
    left: Option<AnyNumeric>,
    reset: Option<TimestampWithTimeZone>,
    /// the refusing policy that frees up first: when; its id, whether it is spent, whether it
    /// is a channel's
    frees: Option<TimestampWithTimeZone>,
    refusing_policy: Option<(i64, bool, bool)>,
    /// the hold of that refusing policy
    refusing_hold: Option<usize>,
    /// holds whose window is spent but not yet marked so (no settle has seen it: the limit was
    /// lowered, a boost ended)
    spent_unmarked: Vec<usize>,
    /// a limit of shadow policies (enforce = false; they form limits of their own): it never
    /// refuses (see [`admit_shadow`])
    shadow: bool,
}

macro_rules! key_query {
    ($known_ids:literal) => {
        concat!(
            "\
SELECT k.key_id, k.user_id, k.enabled, u.enabled, k.expires_at, k.suspended_until,
       EXISTS (SELECT 1 FROM ",
            $known_ids,
            " l WHERE l.request_id = $2)
       OR EXISTS (SELECT 1 FROM quota.released r WHERE r.request_id = $2),
       quota.cost_of(mp, $4, $5, 0), (SELECT g.generation FROM quota.policy_generation g), k.suspended_by,
       r.key_id, r.model, r.est_input_tokens, r.max_output_tokens, r.channel_id
FROM quota.key_for_secret($1) k JOIN quota.app_user u ON u.user_id = k.user_id
LEFT JOIN LATERAL quota.price_for($3) mp ON true
LEFT JOIN quota.reservation r ON r.request_id = $2"
        )
    };
}
const KEY: &str = key_query!("quota.ledger_request");
/// The same on a 0.1.0 schema (see cache::schema).
const KEY_0_1: &str = key_query!("quota.usage_ledger");

/// KEY for a batch's items at once: each found key's row after its item's ordinal.
macro_rules! keys_query {
    ($known_ids:literal) => {
        concat!(
            "\
SELECT i.n, k.key_id, k.user_id, k.enabled, u.enabled, k.expires_at, k.suspended_until,
       EXISTS (SELECT 1 FROM ",
            $known_ids,
            " l WHERE l.request_id = i.request_id)
       OR EXISTS (SELECT 1 FROM quota.released r WHERE r.request_id = i.request_id),
       quota.cost_of(mp, i.est, i.max_out, 0), (SELECT g.generation FROM quota.policy_generation g), k.suspended_by,
       r.key_id, r.model, r.est_input_tokens, r.max_output_tokens, r.channel_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
     WITH ORDINALITY AS i(secret, request_id, model, est, max_out, n)
JOIN LATERAL quota.key_for_secret(i.secret) k ON true JOIN quota.app_user u ON u.user_id = k.user_id
LEFT JOIN LATERAL quota.price_for(i.model) mp ON true
LEFT JOIN LATERAL (SELECT * FROM quota.reservation r WHERE r.request_id = i.request_id LIMIT 1) r ON true"
        )
    };
}
// Lookups by key of rows per item (here the reservation) are LATERAL subqueries with a LIMIT,
// which keeps them from being flattened into a join: as a join, a plan made while the table was
// still empty, and kept for the connection's life, read the table's whole index for every item
// or batch once it had grown (tests/regress 90_plans).
const KEYS: &str = keys_query!("quota.ledger_request");
const KEYS_0_1: &str = keys_query!("quota.usage_ledger");

/// What KEY reads of a request's key (from column `first` on).
pub(super) struct KeyRow {
    pub key_id: i64,
    pub user_id: i64,
    key_enabled: bool,
    user_enabled: bool,
    expires_at: Option<TimestampWithTimeZone>,
    suspended_until: Option<TimestampWithTimeZone>,
    /// its request id was settled or released already
    reused: bool,
    /// NULL when the model has no price: cost policies cannot judge such a request; it passes
    /// them and is recorded as unbilled at settle.
    cost: Option<AnyNumeric>,
    generation: i64,
    suspended_by: Option<i64>,
    /// the reservation already filed under its request id
    filed: Option<Filed>,
}

impl KeyRow {
    fn read(r: &pgrx::spi::SpiHeapTupleData<'_>, first: usize) -> KeyRow {
        let c = |i: usize| first + i - 1;
        KeyRow {
            key_id: col(r, c(1)).unwrap(),
            user_id: col(r, c(2)).unwrap(),
            key_enabled: col(r, c(3)).unwrap(),
            user_enabled: col(r, c(4)).unwrap(),
            expires_at: col(r, c(5)),
            suspended_until: col(r, c(6)),
            reused: col(r, c(7)).unwrap(),
            cost: col(r, c(8)),
            generation: col(r, c(9)).expect("generation is NOT NULL"),
            suspended_by: col(r, c(10)),
            filed: col::<i64>(r, c(11)).map(|filed_key| Filed {
                key_id: filed_key,
                model: col(r, c(12)).unwrap(),
                est: col(r, c(13)).unwrap(),
                max_out: col(r, c(14)).unwrap(),
                channel: col(r, c(15)),
            }),
        }
    }
}

/// The keys of a batch's items (KEYS), by item; an unknown key has none.
pub(super) fn read_keys(
    client: &mut SpiClient<'_>,
    items: &[AdmitItem<'_>],
) -> std::collections::HashMap<usize, KeyRow> {
    let args = [
        items.iter().map(|i| i.api_key).collect::<Vec<_>>().into(),
        items.iter().map(|i| i.request_id).collect::<Vec<_>>().into(),
        items.iter().map(|i| i.model).collect::<Vec<_>>().into(),
        items.iter().map(|i| i.est_input_tokens).collect::<Vec<_>>().into(),
        items.iter().map(|i| i.max_output_tokens).collect::<Vec<_>>().into(),
    ];
    let query = if cache::schema(client).ledger_request { KEYS } else { KEYS_0_1 };
    let mut keys = std::collections::HashMap::with_capacity(items.len());
    for r in run(client, query, &args) {
        let i = usize::try_from(col::<i64>(&r, 1).unwrap() - 1).expect("ordinals start at 1");
        keys.insert(i, KeyRow::read(&r, 2));
    }
    if let Some(k) = keys.values().next() {
        cache::sync(k.generation);
    }
    keys
}

// The upstream of a channel for a model, for a retried admit (see readmit).
const UPSTREAM: &str = "\
SELECT c.base_url, c.api_key, cm.upstream_model
FROM quota.channel c LEFT JOIN quota.channel_model cm ON cm.channel_id = c.channel_id AND cm.model = $2
WHERE c.channel_id = $1";

// Whether a key may pin a channel: a grant to the key, its user or one of the user's groups.
const GRANTED: &str = "\
SELECT EXISTS (SELECT 1 FROM quota.channel_grant g
               WHERE g.channel_id = $1
                 AND (   (g.subject_type = 'key' AND g.subject_id = $2)
                      OR (g.subject_type = 'user' AND g.subject_id = $3)
                      OR (g.subject_type = 'user_group'
                          AND g.subject_id IN (SELECT m.group_id FROM quota.user_group_member m
                                               WHERE m.user_id = $3))))";

// The first request of a day for a model without a price: marks the day (once, whatever the
// concurrency: the marker's primary key) and logs it with the model and the key.
const UNPRICED_SEEN: &str = "\
WITH seen AS (
    INSERT INTO quota.unpriced_model_day (day, model) VALUES (($4 AT TIME ZONE 'UTC')::date, $1)
    ON CONFLICT DO NOTHING RETURNING 1
)
INSERT INTO quota.event (at, kind, key_id, user_id, detail)
SELECT $4, 'unpriced_model', $2, $3, jsonb_build_object('model', $1) FROM seen";

// Routing: the pinned channel, or among enabled channels under all their caps the highest
// priority, then at random by weight (smallest -ln(u)/weight wins).
const CHANNELS: &str = "\
SELECT c.channel_id, c.status = 'enabled', c.base_url, c.api_key, cm.upstream_model
FROM quota.channel_model cm JOIN quota.channel c ON c.channel_id = cm.channel_id
WHERE cm.model = $1 AND ($2::bigint IS NULL OR c.channel_id = $2)
ORDER BY c.status = 'enabled' DESC, c.priority DESC, -ln(1 - random()) / c.weight";

// A channel's counter, locked so that the routing verdict holds until commit (see
// channel_blocked_until); a first request creates it, so racing first requests queue on it too.
const LOCK_COUNTER: &str = "\
SELECT c.window_start, c.used, c.reserved FROM quota.counter c WHERE c.policy_id = $1 AND c.scope_id = $2
FOR UPDATE";

const CREATE_COUNTER: &str = "\
INSERT INTO quota.counter (policy_id, scope_id, window_start) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

// Files the reservation and takes the holds in one statement. The reservation row goes in
// first (the EXISTS runs it before any counter is read), so the counter rows, which a busy key
// shares with every request, stay locked from their update to the commit and no longer. Rolls
// each stale window and reserves, which also locks the counter rows, in the order given (the
// lock order); a first request of a scope creates its row, so concurrent first requests queue
// on it like any other. Returns each counter's settled usage in the window, its reservations
// (this one included) and how its window stands marked (marks!()). When a concurrent admit of
// the same request id filed its reservation first (a retry that raced its first attempt: the
// insert waits for that one to commit), it takes no hold and returns one row of NULLs.
const RESERVE: &str = concat!(
    "\
WITH filed AS (
    INSERT INTO quota.reservation (request_id, key_id, user_id, channel_id, model, counted_in_key_global,
                                   counted_in_user_global, est_input_tokens, max_output_tokens,
                                   hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
), held AS (
    INSERT INTO quota.counter AS c (policy_id, scope_id, window_start, reserved)
    SELECT * FROM unnest($10::bigint[], $11::bigint[], $15::timestamptz[], $12::numeric[])
    WHERE EXISTS (SELECT FROM filed)
    ON CONFLICT (policy_id, scope_id) DO UPDATE SET
        ",
    roll_window!(),
    ",
        reserved     = c.reserved + EXCLUDED.reserved
    RETURNING c.policy_id, c.used, c.reserved, ",
    marks!(),
    "
)
SELECT * FROM held
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL WHERE NOT EXISTS (SELECT FROM filed)"
);

// The reservation filed under a request id (see readmit).
const FILED: &str = "\
SELECT r.key_id, r.model, r.est_input_tokens, r.max_output_tokens, r.channel_id
FROM quota.reservation r WHERE r.request_id = $1";

// A refused request gives its holds back and leaves no reservation.
const UNFILE: &str = "DELETE FROM quota.reservation r WHERE r.request_id = $1";

const RELEASE: &str =
    "UPDATE quota.counter c SET reserved = c.reserved - $3 WHERE c.policy_id = $1 AND c.scope_id = $2";

const FREES_AT: &str = "SELECT quota.window_frees_at(p, $2, $3, $4, $5) FROM quota.policy p WHERE p.policy_id = $1";

/// When a refusing window [ws, we) of a policy and scope frees up (quota.window_frees_at);
/// infinity when it never does.
fn frees_at(
    client: &mut SpiClient<'_>,
    policy_id: i64,
    scope_id: i64,
    ws: TimestampWithTimeZone,
    we: Option<TimestampWithTimeZone>,
    now: TimestampWithTimeZone,
) -> TimestampWithTimeZone {
    let args = [policy_id.into(), scope_id.into(), ws.into(), we.into(), now.into()];
    first(client, FREES_AT, &args).and_then(|r| col(&r, 1)).unwrap_or_else(TimestampWithTimeZone::positive_infinity)
}

const WORDS: &str = "SELECT quota.policy_words(p) FROM quota.policy p WHERE p.policy_id = $1";

const RESUME_KEY: &str = "SELECT quota.resume_key($1, $2, $3)";

/// A suspended key's suspension, judged now. (Made once per request of a suspended key: its
/// size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Suspension {
    /// still in force, by this policy (None: it is not known which)
    Holds(Option<Applicable>),
    /// over before its time: why (the `by` of the key's `resumed` event)
    Lifted(&'static str),
}

/// Judges the suspension of a key by policy `suspended_by`: it ends early once that policy's
/// window for the key is not spent any more (a boost), or once the policy no longer applies to
/// the key (its user left the group). Reads only: a lifted suspension ends after the counters
/// are locked.
fn judge_suspension(
    client: &mut SpiClient<'_>,
    key_id: i64,
    user_id: i64,
    suspended_by: Option<i64>,
    now: TimestampWithTimeZone,
) -> Suspension {
    let Some(policy_id) = suspended_by else {
        return Suspension::Holds(None);
    };
    let Some(a) = cache::policies_for(client, (Some(key_id), Some(user_id), None, None), now)
        .into_iter()
        .find(|a| a.policy.policy_id == policy_id)
    else {
        return Suspension::Lifted("policy_not_applicable");
    };
    let (ws, _) = a.policy.window(crate::window::to_utc(now));
    let seen = counters_now(client, &[(&a.policy, a.scope_id, ws)], false);
    if seen[0].used < a.effective_limit {
        Suspension::Lifted("window_not_spent")
    } else {
        Suspension::Holds(Some(a))
    }
}

#[pg_extern(sql = false)] // declared in sql/schema/40_lifecycle.sql
fn admit(
    api_key: Option<&str>,
    request_id: Option<&str>,
    model: Option<&str>,
    est_input_tokens: Option<i64>,
    max_output_tokens: Option<i64>,
    channel_id: Option<i64>,
) -> pgrx::composite_type!('static, "quota.admission") {
    // a batch of one (quota.admit_many): one implementation of every rule
    let item = AdmitItem { api_key, request_id, model, est_input_tokens, max_output_tokens, channel_id };
    let decision = Spi::connect_mut(|client| {
        super::batch::admit_each(client, std::slice::from_ref(&item)).pop().expect("one decision per item")
    });
    match decision {
        Ok(decision) => decision.into_tuple(),
        Err(e) => e.raise(),
    }
}

/// The arguments of one admit.
pub(super) struct AdmitItem<'a> {
    pub api_key: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub model: Option<&'a str>,
    pub est_input_tokens: Option<i64>,
    pub max_output_tokens: Option<i64>,
    pub channel_id: Option<i64>,
}

/// One admit, in the caller's transaction: its arguments checked, then decided (the counters it
/// touches may be locked already, by its batch).
pub(super) fn admit_item(client: &mut SpiClient<'_>, item: &AdmitItem<'_>) -> Result<Admission, EngineError> {
    let c = checked(item)?;
    decide(client, item.api_key.unwrap_or(""), c.request_id, c.model, c.est, c.max_out, item.channel_id)
}

/// An admit's required arguments, checked.
pub(super) struct Checked<'a> {
    request_id: &'a str,
    pub model: &'a str,
    est: i64,
    max_out: i64,
}

/// The required arguments of an admit, bounded before anything is read or written
/// (pg_quota_core::request).
pub(super) fn checked<'a>(item: &AdmitItem<'a>) -> Result<Checked<'a>, EngineError> {
    let (request_id, model, est, max_out) =
        match (item.request_id, item.model, item.est_input_tokens, item.max_output_tokens) {
            (Some(r), Some(m), Some(e), Some(o)) => (r, m, e, o),
            _ => {
                return fail(
                    b"PQ400",
                    "admit: request_id, model, est_input_tokens and max_output_tokens are required".into(),
                )
            }
        };
    if let Err(e) = pg_quota_core::request::check_admit(request_id, model, est, max_out) {
        return fail(b"PQ400", format!("admit: {e}"));
    }
    Ok(Checked { request_id, model, est, max_out })
}

fn decide(
    client: &mut SpiClient<'_>,
    api_key: &str,
    request_id: &str,
    model: &str,
    est: i64,
    max_out: i64,
    pinned: Option<i64>,
) -> Result<Admission, EngineError> {
    let (now, now_utc) = clock();

    let args: [DatumWithOid; 5] = [api_key.into(), request_id.into(), model.into(), est.into(), max_out.into()];
    let key_query = if cache::schema(client).ledger_request { KEY } else { KEY_0_1 };
    let Some(key) = first(client, key_query, &args).map(|r| KeyRow::read(&r, 1)) else {
        return Ok(Admission::denied(401, "invalid_api_key", "Incorrect API key provided.".into()));
    };
    cache::sync(key.generation);
    let KeyRow {
        key_id,
        user_id,
        key_enabled,
        user_enabled,
        expires_at,
        suspended_until,
        reused,
        cost,
        suspended_by,
        filed,
        ..
    } = key;
    let with_key = |a: Admission| Admission { key_id: Some(key_id), user_id: Some(user_id), ..a };

    // A retry of an admit whose answer the caller lost comes first: the reservation it filed
    // stands, so its decision stands even if the key was disabled or suspended since (refusing
    // now would leave an admitted request to the sweep).
    if let Some(filed) = filed {
        return readmit(client, filed, (key_id, user_id), request_id, model, est, max_out, pinned);
    }
    if let Some((code, message)) = key_refused(key_enabled, user_enabled, expires_at, now) {
        return Ok(with_key(Admission::denied(403, code, message.into())));
    }
    // A suspension lasts until it runs out, or until the window that caused it is not spent any
    // more (a boost, a policy that no longer applies): then it ends with this request.
    let mut resume_early: Option<&str> = None;
    if let Some(until) = suspended_until.filter(|u| u.into_inner() > now.into_inner()) {
        match judge_suspension(client, key_id, user_id, suspended_by, now) {
            Suspension::Lifted(why) => resume_early = Some(why),
            Suspension::Holds(by) => {
                let what = "This API key is suspended because a quota was exhausted.".to_string();
                let mut refused = Admission::refusal("token_quota_policy_exhausted", what, Some(until), now, &RESUMES);
                if let Some(a) = by {
                    refused = refused.exhausted_limit(a.effective_limit, &a.policy.metric, Some(until));
                }
                return Ok(with_key(Admission { channel_id: pinned, ..refused }));
            }
        }
    }
    if reused {
        return fail(b"PQ409", format!("admit: request_id {request_id} was already used"));
    }

    // A model without a price is never silent (logged, the first request of a day), and where
    // pg_quota.unpriced_models says so it is refused to keys that a cost policy applies to.
    let own_subject = (Some(key_id), Some(user_id), Some(model.to_string()), None);
    if cost.is_none() {
        log_unpriced(client, model, (key_id, user_id), now);
        if let Some(refused) = unpriced_refusal(model, &cache::policies_for(client, own_subject.clone(), now)) {
            return Ok(with_key(refused));
        }
    }
    // Routing locks the counters of capped channels, which every customer of a channel shares:
    // a request that its own limits refuse is refused before that.
    if cache::channels(client, model).capped {
        let own = cache::policies_for(client, own_subject, now);
        if let Some(refused) = refused_by_own_limits(client, own, (key_id, user_id), &cost, est, max_out, now) {
            return Ok(with_key(Admission { channel_id: pinned, ..refused }));
        }
    }
    let mut out = with_key(Admission { channel_id: pinned, ..Default::default() });
    let channel = match route(client, &mut out, (key_id, user_id), model, pinned, &cost, est, max_out, now) {
        Ok(channel) => channel,
        Err(refused) => return Ok(with_key(Admission { channel_id: pinned, ..*refused })),
    };

    // One pass over the counters the request counts on, in lock order: roll and reserve in one
    // statement, then judge each limit on the values before the hold. If any limit refuses,
    // the holds taken are given back before returning: all or nothing.
    let applicable = cache::policies_for(client, (Some(key_id), Some(user_id), Some(model.to_string()), channel), now);
    if cost.is_none() {
        // the channel routed to may have a cost cap
        if let Some(refused) = unpriced_refusal(model, &applicable) {
            return Ok(with_key(refused));
        }
    }
    let (holds, iso_key, iso_user) = holds_for(applicable, &cost, est, max_out, now_utc);
    // per hold: its counter's policy, used, reserved and marks (see RESERVE); None: not filed
    type Counter = (i64, AnyNumeric, AnyNumeric, bool, bool);
    let counters: Vec<Option<Counter>> = run(
        client,
        RESERVE,
        &[
            request_id.into(),
            key_id.into(),
            user_id.into(),
            channel.into(),
            model.into(),
            (!iso_key).into(),
            (!iso_user).into(),
            est.into(),
            max_out.into(),
            holds.iter().map(|h| h.policy.policy_id).collect::<Vec<_>>().into(),
            holds.iter().map(|h| h.scope_id).collect::<Vec<_>>().into(),
            holds.iter().map(|h| h.amount.clone()).collect::<Vec<_>>().into(),
            holds.iter().map(|h| h.effective_limit.clone()).collect::<Vec<_>>().into(),
            now.into(),
            holds.iter().map(|h| h.policy.counter_window(h.ws)).collect::<Vec<_>>().into(),
        ],
    )
    .map(|r| {
        col::<i64>(&r, 1).map(|policy_id| {
            (policy_id, col(&r, 2).unwrap(), col(&r, 3).unwrap(), col(&r, 4).unwrap(), col(&r, 5).unwrap())
        })
    })
    .collect();
    let Some(counters) = counters.into_iter().collect::<Option<Vec<_>>>() else {
        // Another admit of this request id filed it first and has committed: this is a retry.
        let Some(r) = first(client, FILED, &[request_id.into()]) else {
            return fail(b"PQ409", format!("admit: request_id {request_id} was already used"));
        };
        let filed = Filed {
            key_id: col(&r, 1).unwrap(),
            model: col(&r, 2).unwrap(),
            est: col(&r, 3).unwrap(),
            max_out: col(&r, 4).unwrap(),
            channel: col(&r, 5),
        };
        return readmit(client, filed, (key_id, user_id), request_id, model, est, max_out, pinned);
    };
    assert_eq!(counters.len(), holds.len(), "pg_quota: one counter row per hold");
    let who = (key_id, user_id);
    let mut seen: Vec<Seen> = Vec::with_capacity(holds.len());
    for (h, (counter_policy, used, reserved_now, marked_spent, ended_spent)) in holds.iter().zip(counters) {
        assert_eq!(counter_policy, h.policy.policy_id, "pg_quota: counters come back in hold order");
        // A window found spent that has ended since has recovered: that is logged and its mark
        // cleared (its counter row is locked already).
        if ended_spent {
            recover_window(client, &h.policy, h.scope_id, who, Recovered::WindowReset(h.ws), now);
        }
        seen.push(Seen {
            used: window_used(client, &h.policy, h.scope_id, h.ws, used),
            reserved: reserved_now - h.amount.clone(), // as it was before this hold
            marked_spent,
        });
    }
    let mut limits = judge(client, &holds, &seen, now, hold_refused);
    for (hi, spent) in admit_shadow(&mut limits) {
        let (h, s) = (&holds[hi], &seen[hi]);
        let used_limit = (s.used.clone(), h.effective_limit.clone());
        alerts::log_shadow_refusal(client, &h.policy, h.scope_id, Some(who), h.ws, used_limit, spent, now);
    }

    // A window marked spent that is not spent any more (a boost, a rolling window's usage aged
    // out) has recovered too: logged and unmarked, so that it is logged and acted on again when
    // it is spent again.
    for (h, _) in holds.iter().zip(&seen).filter(|(h, s)| s.marked_spent && s.used < h.effective_limit) {
        recover_window(client, &h.policy, h.scope_id, who, Recovered::WindowNotSpent, now);
    }

    if let Some(refused) = refusal(client, &limits, &holds, who, channel, now) {
        for h in &holds {
            let args = [h.policy.policy_id.into(), h.scope_id.into(), h.amount.clone().into()];
            run(client, RELEASE, &args);
        }
        run(client, UNFILE, &[request_id.into()]);
        return Ok(with_key(refused));
    }
    rate_headers(&mut out, &limits);

    // A suspension that has run out ends here, lazily (quota.sweep() does it too), and one
    // whose window is not spent any more ends early. (Here, after the counters: lock order.)
    if suspended_until.is_some() {
        run(client, RESUME_KEY, &[key_id.into(), now.into(), resume_early.into()]);
    }

    out.allowed = true;
    out.http_status = 200;
    Ok(out)
}

/// The tightest admitted limit (least share left) feeds the rate-limit headers.
fn rate_headers(out: &mut Admission, limits: &[Limit]) {
    let tight = limits.iter().filter(|l| l.ok && !l.shadow).min_by(|a, b| {
        let share = |l: &Limit| l.left.clone().unwrap_or_else(|| AnyNumeric::from(0)) / l.effective_limit.clone();
        share(a).partial_cmp(&share(b)).unwrap_or(std::cmp::Ordering::Equal)
    });
    if let Some(tight) = tight {
        out.ratelimit_limit = Some(tight.effective_limit.clone());
        out.ratelimit_remaining = tight.left.clone();
        out.ratelimit_metric = Some(tight.metric.clone());
        out.ratelimit_reset_at = tight.reset;
    }
}

/// The reservation already filed under a request id: what its admit was asked.
struct Filed {
    key_id: i64,
    model: String,
    est: i64,
    max_out: i64,
    channel: Option<i64>,
}

/// An admit of a request id that has a reservation: a caller that lost its connection during
/// admit does not know whether it committed, and runs it again. With the same key, model,
/// estimate and output limit (and a pinned channel, if any, the one the reservation holds) it
/// gets the original decision back: admitted to the same channel, nothing held twice (the
/// rate-limit fields stay empty). Anything else is a reused request id (PQ409).
#[allow(clippy::too_many_arguments)]
fn readmit(
    client: &mut SpiClient<'_>,
    filed: Filed,
    (key_id, user_id): (i64, i64),
    request_id: &str,
    model: &str,
    est: i64,
    max_out: i64,
    pinned: Option<i64>,
) -> Result<Admission, EngineError> {
    let same = filed.key_id == key_id
        && filed.model == model
        && filed.est == est
        && filed.max_out == max_out
        && pinned.is_none_or(|p| filed.channel == Some(p) && granted(client, p, (key_id, user_id)));
    if !same {
        return fail(b"PQ409", format!("admit: request_id {request_id} was already used"));
    }
    let mut out = Admission {
        allowed: true,
        http_status: 200,
        key_id: Some(key_id),
        user_id: Some(user_id),
        channel_id: filed.channel,
        ..Default::default()
    };
    if let Some(upstream) = filed.channel.and_then(|c| first(client, UPSTREAM, &[c.into(), model.into()])) {
        out.upstream_base_url = col(&upstream, 1);
        out.upstream_api_key = col(&upstream, 2);
        out.upstream_model = col(&upstream, 3);
    }
    Ok(out)
}

/// Whether a key may pin a channel (see GRANTED).
fn granted(client: &mut SpiClient<'_>, channel_id: i64, (key_id, user_id): (i64, i64)) -> bool {
    first(client, GRANTED, &[channel_id.into(), key_id.into(), user_id.into()])
        .and_then(|r| col::<bool>(&r, 1))
        .unwrap_or(false)
}

/// A hold that a request takes, or would take, on one policy's counter.
struct Hold {
    policy: Policy,
    scope_id: i64,
    limit_key: String,
    effective_limit: AnyNumeric,
    amount: AnyNumeric,
    ws: TimestampWithTimeZone,
    we: Option<TimestampWithTimeZone>,
}

/// What a hold's counter shows: the settled usage of the hold's window, the reservations of
/// other requests, whether the window is marked spent.
struct Seen {
    used: AnyNumeric,
    reserved: AnyNumeric,
    marked_spent: bool,
}

/// The holds of a request on the policies that apply (in their order, the lock order), and
/// whether an exclusive policy takes it out of the key's and the user's global policies. A
/// cost policy takes no hold for a model without a price.
fn holds_for(
    applicable: Vec<Applicable>,
    cost: &Option<AnyNumeric>,
    est: i64,
    max_out: i64,
    now_utc: chrono::DateTime<chrono::Utc>,
) -> (Vec<Hold>, bool, bool) {
    let (mut iso_key, mut iso_user) = (false, false);
    let mut holds: Vec<Hold> = Vec::with_capacity(applicable.len());
    for a in applicable {
        if a.policy.exclusive {
            iso_key |= a.axis == "key";
            iso_user |= a.axis == "user";
        }
        let Some(amount) = metric_amount(&a.policy.metric, cost.clone(), Some(est), Some(max_out)) else {
            continue;
        };
        let (ws, we) = a.policy.window(now_utc);
        holds.push(Hold {
            policy: a.policy,
            scope_id: a.scope_id,
            limit_key: a.limit_key,
            effective_limit: a.effective_limit,
            amount,
            ws,
            we,
        });
    }
    (holds, iso_key, iso_user)
}

/// Whether a hold's policy refuses it, given what its counter shows ([`refuses`]).
fn hold_refused(h: &Hold, s: &Seen) -> bool {
    refuses(&h.policy.boundary, h.effective_limit.clone(), s.used.clone(), s.reserved.clone(), h.amount.clone())
}

/// Groups the holds into limits and judges each: a limit admits when any of its policies does
/// (`refusing` says whether one refuses).
fn judge(
    client: &mut SpiClient<'_>,
    holds: &[Hold],
    seen: &[Seen],
    now: TimestampWithTimeZone,
    refusing: impl Fn(&Hold, &Seen) -> bool,
) -> Vec<Limit> {
    let mut limits: Vec<Limit> = Vec::new();
    for (hi, (h, s)) in holds.iter().zip(seen).enumerate() {
        let gi = match limits.iter().position(|l| l.key == h.limit_key) {
            Some(gi) => gi,
            None => {
                limits.push(Limit {
                    key: h.limit_key.clone(),
                    ok: false,
                    effective_limit: h.effective_limit.clone(),
                    metric: h.policy.metric.clone(),
                    left: None,
                    reset: None,
                    frees: None,
                    refusing_policy: None,
                    refusing_hold: None,
                    spent_unmarked: vec![],
                    shadow: !h.policy.enforce,
                });
                limits.len() - 1
            }
        };
        let limit = &mut limits[gi];
        if !refusing(h, s) {
            // A limit admits when any of its policies does; its headers follow its roomiest one.
            let mut left = h.effective_limit.clone() - s.used.clone() - s.reserved.clone() - h.amount.clone();
            if left < AnyNumeric::from(0) {
                left = AnyNumeric::from(0);
            }
            limit.ok = true;
            if limit.left.as_ref().is_none_or(|l| left > *l) {
                limit.left = Some(left);
                limit.reset = h.we;
            }
        } else {
            let spent = s.used >= h.effective_limit;
            if spent && !s.marked_spent {
                limit.spent_unmarked.push(hi);
            }
            let frees = frees_at(client, h.policy.policy_id, h.scope_id, h.ws, h.we, now);
            if limit.frees.is_none_or(|f| frees.into_inner() < f.into_inner()) {
                limit.frees = Some(frees);
                limit.refusing_policy = Some((h.policy.policy_id, spent, h.policy.subject_type == "channel"));
                limit.refusing_hold = Some(hi);
            }
        }
    }
    limits
}

/// Shadow limits admit what they would refuse: returns, for each that would, the hold of its
/// refusing policy and whether its window is spent, for the caller to log (on locked counters).
fn admit_shadow(limits: &mut [Limit]) -> Vec<(usize, bool)> {
    let mut would_refuse = Vec::new();
    for l in limits.iter_mut().filter(|l| l.shadow && !l.ok) {
        if let (Some(hi), Some((_, spent, _))) = (l.refusing_hold, l.refusing_policy) {
            would_refuse.push((hi, spent));
        }
        l.ok = true;
        l.spent_unmarked.clear();
    }
    would_refuse
}

/// The 429 of a request that a limit refuses, or None when every limit admits it. With several
/// refused limits it reports the one that frees up last. The refused limits' spent windows
/// that no settle has marked are marked, logged and acted on (on_exhausted) first, as a settle
/// would have done.
fn refusal(
    client: &mut SpiClient<'_>,
    limits: &[Limit],
    holds: &[Hold],
    (key_id, user_id): (i64, i64),
    channel: Option<i64>,
    now: TimestampWithTimeZone,
) -> Option<Admission> {
    // (max_by_key keeps the last of equals, so search from the end to keep the first)
    let worst = limits.iter().rev().filter(|l| !l.ok).max_by_key(|l| l.frees.map(|f| f.into_inner()))?;
    for hi in limits.iter().filter(|l| !l.ok).flat_map(|l| &l.spent_unmarked) {
        let h = &holds[*hi];
        mark_exhausted(client, &h.policy, h.scope_id, (key_id, user_id), (h.ws, h.we), now);
    }
    let (policy_id, spent, channel_policy) = worst.refusing_policy.expect("a refused limit has a refusing policy");
    let words = first(client, WORDS, &[policy_id.into()]).and_then(|r| col::<String>(&r, 1)).unwrap_or_default();
    let what =
        if spent { format!("The {words} is exhausted.") } else { format!("This request would exceed the {words}.") };
    let code = if channel_policy { "channel_quota_exhausted" } else { "token_quota_policy_exhausted" };
    // the refusing limit feeds the rate-limit headers of the 429
    Some(Admission {
        channel_id: channel,
        ..Admission::refusal(code, what, worst.frees, now, &RESETS).exhausted_limit(
            worst.effective_limit.clone(),
            &worst.metric,
            worst.frees,
        )
    })
}

// Each hold's counter as it is, without a lock: whether the hold's window is the counter's and
// marked spent, and the counter's usage in it.
const COUNTERS: &str = "\
SELECT coalesce(c.window_start = h.window_start AND c.exhausted_at >= c.window_start, false),
       CASE WHEN c.window_start = h.window_start THEN c.used ELSE 0 END, coalesce(c.reserved, 0)
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) WITH ORDINALITY AS h(policy_id, scope_id, window_start, i)
LEFT JOIN LATERAL (SELECT * FROM quota.counter c WHERE c.policy_id = h.policy_id AND c.scope_id = h.scope_id LIMIT 1) c
       ON true
ORDER BY h.i";

/// The counters of policies for scopes, each in its window starting at the instant given, as
/// they are, without a lock (see COUNTERS). A rolling window's usage is summed from its buckets:
/// for every rolling window, or with `rolling_if_marked` only for those marked spent (the others
/// then show the counter's 0).
fn counters_now(
    client: &mut SpiClient<'_>,
    windows: &[(&Policy, i64, TimestampWithTimeZone)],
    rolling_if_marked: bool,
) -> Vec<Seen> {
    let args = [
        windows.iter().map(|(p, _, _)| p.policy_id).collect::<Vec<_>>().into(),
        windows.iter().map(|(_, scope, _)| *scope).collect::<Vec<_>>().into(),
        windows.iter().map(|(p, _, ws)| p.counter_window(*ws)).collect::<Vec<_>>().into(),
    ];
    let counters: Vec<(bool, AnyNumeric, AnyNumeric)> =
        run(client, COUNTERS, &args).map(|r| (col(&r, 1).unwrap(), col(&r, 2).unwrap(), col(&r, 3).unwrap())).collect();
    let mut seen: Vec<Seen> = Vec::with_capacity(windows.len());
    for ((policy, scope_id, ws), (marked_spent, used, reserved)) in windows.iter().zip(counters) {
        seen.push(Seen {
            used: if rolling_if_marked && !marked_spent {
                used
            } else {
                window_used(client, policy, *scope_id, *ws, used)
            },
            reserved,
            marked_spent,
        });
    }
    seen
}

/// The 429 of a request that its own (key and user) limits refuse, judged completely (a window
/// spent, or a strict one the estimate would overshoot: the rule of [`refuses`]) on the counters
/// as they are, without a lock; or None. Such a request is refused before routing, which locks
/// the counters of channels that every customer of a channel shares: a client retrying its
/// 429s in a loop slows nobody else down. Writes only to mark a spent window that no settle has
/// marked (its own counter). A request admitted here is judged again after routing, on locked
/// counters.
fn refused_by_own_limits(
    client: &mut SpiClient<'_>,
    own: Vec<Applicable>,
    who: (i64, i64),
    cost: &Option<AnyNumeric>,
    est: i64,
    max_out: i64,
    now: TimestampWithTimeZone,
) -> Option<Admission> {
    let (holds, _, _) = holds_for(own, cost, est, max_out, crate::window::to_utc(now));
    if holds.is_empty() {
        return None;
    }
    let windows: Vec<_> = holds.iter().map(|h| (&h.policy, h.scope_id, h.ws)).collect();
    let seen = counters_now(client, &windows, false);
    let mut limits = judge(client, &holds, &seen, now, hold_refused);
    admit_shadow(&mut limits); // logged by the judgement on locked counters
    refusal(client, &limits, &holds, who, None, now)
}

/// Logs the first request of the day (UTC) for a model without a price: an `unpriced_model`
/// event with the model and the key, once per model and day (the marker row's primary key makes
/// it once across backends; a later request of the day finds the marker, one index probe, and
/// writes nothing). Not remembered per backend: a marker rolled back with its transaction must
/// be written again.
fn log_unpriced(client: &mut SpiClient<'_>, model: &str, (key_id, user_id): (i64, i64), now: TimestampWithTimeZone) {
    run(client, UNPRICED_SEEN, &[model.into(), key_id.into(), user_id.into(), now.into()]);
}

/// The 400 of a request for a model without a price under `pg_quota.unpriced_models = 'refuse'`
/// when a cost policy among `applicable` would count it (a cost policy cannot judge a request it
/// cannot price); None otherwise.
fn unpriced_refusal(model: &str, applicable: &[Applicable]) -> Option<Admission> {
    let refuse = UNPRICED_MODELS.get() == UnpricedModels::Refuse;
    (refuse && applicable.iter().any(|a| a.policy.metric == "cost")).then(|| {
        Admission::denied(
            400,
            "model_not_priced",
            format!("Model {model} has no price, and a spending limit applies to this request: unpriced models are refused."),
        )
    })
}

/// A channel that cannot take a request now: when it can again (all its refusing caps have
/// freed up; infinity when a total window refuses), and the cap that frees up last.
struct Blocked {
    until: TimestampWithTimeZone,
    limit: AnyNumeric,
    metric: String,
}

impl Blocked {
    /// A cap `a` of a channel refuses the request in the window [ws, we): the channel is blocked
    /// until that cap frees up too (the last of its refusing caps gives `blocked`).
    fn by_cap(
        blocked: &mut Option<Blocked>,
        client: &mut SpiClient<'_>,
        a: Applicable,
        (ws, we): (TimestampWithTimeZone, Option<TimestampWithTimeZone>),
        now: TimestampWithTimeZone,
    ) {
        let frees = frees_at(client, a.policy.policy_id, a.scope_id, ws, we, now);
        if blocked.as_ref().is_none_or(|b| frees.into_inner() > b.until.into_inner()) {
            *blocked = Some(Blocked { until: frees, limit: a.effective_limit, metric: a.policy.metric });
        }
    }

    /// Keeps in `soonest` the blocked channel that frees up first.
    fn keep_soonest(soonest: &mut Option<Blocked>, b: Blocked) {
        if soonest.as_ref().is_none_or(|s| b.until.into_inner() < s.until.into_inner()) {
            *soonest = Some(b);
        }
    }
}

/// Routes a request to a channel: its id and upstream in `out`.
fn route_to(
    out: &mut Admission,
    channel_id: i64,
    (base_url, api_key, upstream_model): (Option<String>, Option<String>, Option<String>),
) -> i64 {
    out.channel_id = Some(channel_id);
    out.upstream_base_url = base_url;
    out.upstream_api_key = api_key;
    out.upstream_model = upstream_model;
    channel_id
}

/// The refusal of a request that no channel takes: the pinned channel does not serve the model
/// (`serves` false) or is disabled, no channel serving it is enabled, or (`soonest`) every one is
/// blocked by its caps.
fn unroutable(
    model: &str,
    pinned: Option<i64>,
    serves: bool,
    soonest: Option<Blocked>,
    now: TimestampWithTimeZone,
) -> Admission {
    match (pinned, soonest) {
        // (granted, so it exists)
        (Some(p), _) if !serves => {
            Admission::denied(400, "invalid_channel", format!("Channel {p} does not serve model {model}."))
        }
        (None, None) => {
            Admission::denied(503, "no_channel_available", format!("No upstream channel for model {model} is enabled."))
        }
        (Some(p), None) => Admission::denied(503, "channel_unavailable", format!("Channel {p} is disabled.")),
        // the cap that frees up first feeds the rate-limit headers of the 429
        (pinned, Some(b)) => {
            let (code, what) = match pinned {
                None => (
                    "all_channels_exhausted",
                    format!("Every upstream channel for model {model} has reached its quota."),
                ),
                Some(p) => ("channel_quota_exhausted", format!("Channel {p} has reached its quota.")),
            };
            Admission::refusal(code, what, Some(b.until), now, &RESETS).exhausted_limit(
                b.limit,
                &b.metric,
                Some(b.until),
            )
        }
    }
}

/// When a channel can take a request again: None when it can take it now (under every cap),
/// else see [`Blocked`]. Locks the channel's counters, so the verdict holds until commit:
/// admit routes around a channel that a concurrent request just filled instead of refusing.
/// Routing visits channels before any key or user counter is locked, and in one order
/// (priority) for everyone, except that channels of equal priority are visited in
/// weighted-random order; a deadlock there needs two requests to both find their first pick
/// full at once; PostgreSQL breaks it (40P01) and the relay runs the admit that lost again.
fn channel_blocked_until(
    client: &mut SpiClient<'_>,
    channel_id: i64,
    cost: &Option<AnyNumeric>,
    est: i64,
    max_out: i64,
    now: TimestampWithTimeZone,
) -> Option<Blocked> {
    let now_utc = crate::window::to_utc(now);
    let mut blocked: Option<Blocked> = None;
    for a in cache::policies_for(client, (None, None, None, Some(channel_id)), now) {
        let Some(amount) = metric_amount(&a.policy.metric, cost.clone(), Some(est), Some(max_out)) else {
            continue;
        };
        let (ws, we) = a.policy.window(now_utc);
        let key = [a.policy.policy_id.into(), a.scope_id.into()];
        let (window_start, used, reserved): (TimestampWithTimeZone, AnyNumeric, AnyNumeric) = loop {
            if let Some(r) = first(client, LOCK_COUNTER, &key) {
                break (col(&r, 1).unwrap(), col(&r, 2).unwrap(), col(&r, 3).unwrap());
            }
            run(
                client,
                CREATE_COUNTER,
                &[a.policy.policy_id.into(), a.scope_id.into(), a.policy.counter_window(ws).into()],
            );
        };
        let used = if window_start == ws { used } else { AnyNumeric::from(0) };
        let used = window_used(client, &a.policy, a.scope_id, ws, used);
        if refuses(&a.policy.boundary, a.effective_limit.clone(), used.clone(), reserved, amount) {
            if !a.policy.enforce {
                // a shadow cap never takes a channel out of routing
                let spent = used >= a.effective_limit;
                let used_limit = (used, a.effective_limit.clone());
                alerts::log_shadow_refusal(client, &a.policy, a.scope_id, None, ws, used_limit, spent, now);
                continue;
            }
            Blocked::by_cap(&mut blocked, client, a, (ws, we), now);
        }
    }
    blocked
}

/// Chooses the channel (see CHANNELS) and fills the upstream fields of `out`. Ok(None): no
/// channel serves the model, the relay's default upstream takes it. Err: the decision to return.
#[allow(clippy::too_many_arguments)]
fn route(
    client: &mut SpiClient<'_>,
    out: &mut Admission,
    (key_id, user_id): (i64, i64),
    model: &str,
    pinned: Option<i64>,
    cost: &Option<AnyNumeric>,
    est: i64,
    max_out: i64,
    now: TimestampWithTimeZone,
) -> Result<Option<i64>, Box<Admission>> {
    // Pinning needs a grant; without one, whether the channel exists is nobody's business.
    if let Some(p) = pinned {
        if !granted(client, p, (key_id, user_id)) {
            return Err(Box::new(Admission::denied(
                403,
                "channel_not_allowed",
                "This API key may not choose its upstream channel.".into(),
            )));
        }
    }
    if pinned.is_none() && !cache::channels(client, model).served {
        return Ok(None);
    }
    type Candidate = (i64, bool, Option<String>, Option<String>, Option<String>);
    let candidates: Vec<Candidate> = run(client, CHANNELS, &[model.into(), pinned.into()])
        .map(|r| (col(&r, 1).unwrap(), col(&r, 2).unwrap(), col(&r, 3), col(&r, 4), col(&r, 5)))
        .collect();
    // the blocked channel that frees up first
    let mut soonest: Option<Blocked> = None;
    for (id, enabled, base_url, upstream_key, upstream_model) in candidates.iter().cloned() {
        if !enabled {
            break;
        }
        match channel_blocked_until(client, id, cost, est, max_out, now) {
            None => return Ok(Some(route_to(out, id, (base_url, upstream_key, upstream_model)))),
            Some(b) => Blocked::keep_soonest(&mut soonest, b),
        }
    }
    if candidates.is_empty() && pinned.is_none() {
        return Ok(None);
    }
    Err(Box::new(unroutable(model, pinned, !candidates.is_empty(), soonest, now)))
}

/// A counter as a batch locked it, kept in step in memory as the batch's admits take holds on
/// it (written when they are filed: see [`file`]).
pub(super) struct Locked {
    pub window_start: TimestampWithTimeZone,
    pub used: AnyNumeric,
    pub reserved: AnyNumeric,
    pub exhausted_at: Option<TimestampWithTimeZone>,
    /// a rolling window's settled usage, once read (see [`used_locked`])
    pub rolling_used: Option<AnyNumeric>,
}

/// A batch's counters by (policy, scope).
pub(super) type LockedCounters = std::collections::HashMap<(i64, i64), Locked>;

/// An admitted request of a batch whose reservation and holds are not written yet.
pub(super) struct Filing {
    pub item: usize,
    channel_id: Option<i64>,
    pub request_id: String,
    key_id: i64,
    user_id: i64,
    model: String,
    in_key_global: bool,
    in_user_global: bool,
    est: i64,
    max_out: i64,
    /// per hold: policy, scope, amount, effective limit, counter window
    holds: Vec<(i64, i64, AnyNumeric, AnyNumeric, TimestampWithTimeZone)>,
}

/// How a batch's admit went in memory (see [`decide_locked`]).
pub(super) enum Locally {
    /// answered (refused) without writing anything
    Answered(Result<Admission, EngineError>),
    /// admitted: its reservation and holds are to be filed
    Admitted(Admission, Filing),
    /// more than a hold on counters the batch has locked: the single call's path decides it
    Single,
}

/// An admit of a batch decided by the same rules as [`decide`], on the key the batch read and
/// the counters it locked, without writing (but an unpriced model's log): the request that is
/// simply admitted or refused by its own limits. Whatever else writes (a suspension to judge or
/// end, routing to a channel, a window to mark spent or recovered, a shadow policy's refusal, a
/// rolling window, a retry) is left to the single call's path ([`Locally::Single`]), which the
/// batch runs once what came before is written.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_locked(
    client: &mut SpiClient<'_>,
    item: usize,
    args: &Checked<'_>,
    pinned: Option<i64>,
    key: Option<&KeyRow>,
    counters: &mut LockedCounters,
    routes: &mut Routes,
    now: TimestampWithTimeZone,
) -> Locally {
    let Some(key) = key else {
        let denied = Admission::denied(401, "invalid_api_key", "Incorrect API key provided.".into());
        return Locally::Answered(Ok(denied));
    };
    let who = (key.key_id, key.user_id);
    let with_key = |a: Admission| Admission { key_id: Some(key.key_id), user_id: Some(key.user_id), ..a };
    if key.filed.is_some() || key.suspended_until.is_some() {
        return Locally::Single;
    }
    if let Some((code, message)) = key_refused(key.key_enabled, key.user_enabled, key.expires_at, now) {
        return Locally::Answered(Ok(with_key(Admission::denied(403, code, message.into()))));
    }
    if key.reused {
        let id = args.request_id;
        return Locally::Answered(fail(b"PQ409", format!("admit: request_id {id} was already used")));
    }
    if pinned.is_some() {
        return Locally::Single; // (a grant to check)
    }
    let own_subject = (Some(who.0), Some(who.1), Some(args.model.to_string()), None);
    let own = cache::policies_for(client, own_subject, now);
    if key.cost.is_none() {
        // (writes only its own marker and event: nothing the batch has read)
        log_unpriced(client, args.model, who, now);
        if let Some(refused) = unpriced_refusal(args.model, &own) {
            return Locally::Answered(Ok(with_key(refused)));
        }
    }
    let now_utc = crate::window::to_utc(now);
    let (est, max_out) = (args.est, args.max_out);
    let channels = cache::channels(client, args.model);
    let mut out = with_key(Admission::default());
    let mut channel = None;
    if channels.served {
        // Routing takes the counters of capped channels, which every customer of a channel
        // shares: a request that its own limits refuse is refused before that.
        if channels.capped {
            let (holds, _, _) = holds_for(own, &key.cost, est, max_out, now_utc);
            let Some(seen) = seen_locked(client, &holds, counters) else { return Locally::Single };
            let mut limits = judge(client, &holds, &seen, now, hold_refused);
            admit_shadow(&mut limits); // logged by the judgement after routing
            if limits.iter().any(|l| !l.ok && !l.spent_unmarked.is_empty()) {
                return Locally::Single;
            }
            if let Some(refused) = refusal(client, &limits, &holds, who, None, now) {
                return Locally::Answered(Ok(with_key(refused)));
            }
        }
        match route_locked(client, &mut out, args.model, (&key.cost, est, max_out), counters, routes, now) {
            Routed::To(id) => channel = Some(id),
            Routed::Default => {}
            Routed::Refused(refused) => return Locally::Answered(Ok(with_key(*refused))),
            Routed::Single => return Locally::Single,
        }
    }
    let applicable =
        cache::policies_for(client, (Some(who.0), Some(who.1), Some(args.model.to_string()), channel), now);
    if key.cost.is_none() {
        // the channel routed to may have a cost cap
        if let Some(refused) = unpriced_refusal(args.model, &applicable) {
            return Locally::Answered(Ok(with_key(refused)));
        }
    }
    let (holds, iso_key, iso_user) = holds_for(applicable, &key.cost, est, max_out, now_utc);
    let Some(seen) = seen_locked(client, &holds, counters) else { return Locally::Single };
    let limits = judge(client, &holds, &seen, now, hold_refused);
    let recovered = holds.iter().zip(&seen).any(|(h, s)| s.marked_spent && s.used < h.effective_limit);
    let unmarked = limits.iter().any(|l| !l.ok && !l.spent_unmarked.is_empty());
    if recovered || unmarked || limits.iter().any(|l| l.shadow && !l.ok) {
        return Locally::Single;
    }
    if let Some(refused) = refusal(client, &limits, &holds, who, channel, now) {
        return Locally::Answered(Ok(with_key(refused)));
    }
    out.allowed = true;
    out.http_status = 200;
    rate_headers(&mut out, &limits);
    for h in &holds {
        let cw = h.policy.counter_window(h.ws);
        let c = counters.get_mut(&(h.policy.policy_id, h.scope_id)).expect("seen above");
        if c.window_start != cw {
            c.window_start = cw;
            c.used = AnyNumeric::from(0);
        }
        c.reserved = c.reserved.clone() + h.amount.clone();
    }
    let filing = filing(item, args, who, channel, &holds, (iso_key, iso_user));
    Locally::Admitted(out, filing)
}

/// What each hold's counter shows, from the batch's locked counters, rolled to the hold's window
/// (as RESERVE would roll it); None when one is not among them, or when one was marked spent in
/// a window that has ended (a recovery to log): the single call's path then decides.
fn seen_locked(client: &mut SpiClient<'_>, holds: &[Hold], counters: &mut LockedCounters) -> Option<Vec<Seen>> {
    let mut seen: Vec<Seen> = Vec::with_capacity(holds.len());
    for h in holds {
        let cw = h.policy.counter_window(h.ws);
        let c = counters.get_mut(&(h.policy.policy_id, h.scope_id))?;
        let exhausted = c.exhausted_at.map(|e| e.into_inner());
        if exhausted.is_some_and(|e| e < cw.into_inner()) {
            return None;
        }
        seen.push(Seen {
            used: used_locked(client, &h.policy, h.scope_id, h.ws, c),
            reserved: c.reserved.clone(),
            marked_spent: exhausted.is_some_and(|e| e >= cw.into_inner()),
        });
    }
    Some(seen)
}

/// Settled usage of a policy's window starting at `ws` on a batch's locked counter (see
/// [`window_used`]): the counter's, unless it holds another window; a rolling window's, the sum
/// of its buckets, read once per batch (admits do not change it, and the batch shares one clock).
fn used_locked(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    ws: TimestampWithTimeZone,
    c: &mut Locked,
) -> AnyNumeric {
    if policy.rolling() {
        if c.rolling_used.is_none() {
            c.rolling_used = Some(super::rolling_used(client, policy.policy_id, scope_id, ws));
        }
        return c.rolling_used.clone().expect("read above");
    }
    if c.window_start == policy.counter_window(ws) {
        c.used.clone()
    } else {
        AnyNumeric::from(0)
    }
}

/// A channel serving a model: id, enabled, priority, weight, and its upstream.
pub(super) struct Route {
    pub channel_id: i64,
    pub enabled: bool,
    priority: i32,
    weight: f64,
    base_url: Option<String>,
    api_key: Option<String>,
    upstream_model: Option<String>,
}

/// The channels serving each model, read once per batch (see ROUTES).
pub(super) type Routes = std::collections::HashMap<String, Vec<Route>>;

// The channels serving a model, for routing in memory (CHANNELS orders them per request).
const ROUTES: &str = "\
SELECT c.channel_id, c.status = 'enabled', c.priority, c.weight::float8, c.base_url, c.api_key, cm.upstream_model
FROM quota.channel_model cm JOIN quota.channel c ON c.channel_id = cm.channel_id
WHERE cm.model = $1";

/// The channels serving a model, enabled or not, read once per batch (ROUTES).
pub(super) fn routes_for<'r>(client: &mut SpiClient<'_>, routes: &'r mut Routes, model: &str) -> &'r [Route] {
    if !routes.contains_key(model) {
        let found = run(client, ROUTES, &[model.into()])
            .map(|r| Route {
                channel_id: col(&r, 1).unwrap(),
                enabled: col(&r, 2).unwrap(),
                priority: col(&r, 3).unwrap(),
                weight: col(&r, 4).unwrap(),
                base_url: col(&r, 5),
                api_key: col(&r, 6),
                upstream_model: col(&r, 7),
            })
            .collect();
        routes.insert(model.to_string(), found);
    }
    &routes[model]
}

/// How routing went in memory (see [`route_locked`]).
enum Routed {
    To(i64),
    /// no channel serves the model: the relay's default upstream takes it
    Default,
    Refused(Box<Admission>),
    Single,
}

/// Routing as [`route`] does it, on the batch's locked counters: among enabled channels under
/// all their caps, the highest priority, then at random by weight (CHANNELS' order); a blocked
/// channel's refusal as there. A shadow cap that would refuse (an event to log) leaves the
/// request to the single call's path.
fn route_locked(
    client: &mut SpiClient<'_>,
    out: &mut Admission,
    model: &str,
    (cost, est, max_out): (&Option<AnyNumeric>, i64, i64),
    counters: &mut LockedCounters,
    routes: &mut Routes,
    now: TimestampWithTimeZone,
) -> Routed {
    let candidates = routes_for(client, routes, model);
    if candidates.is_empty() {
        return Routed::Default;
    }
    // enabled first, then by priority, then smallest -ln(u)/weight (u uniform in (0, 1])
    let mut order: Vec<(&Route, f64)> = candidates
        .iter()
        .map(|r| {
            // SAFETY: PostgreSQL's global generator, in this backend's only thread
            let u = unsafe { pg_sys::pg_prng_double(&raw mut pg_sys::pg_global_prng_state) };
            (r, -(1.0 - u).ln() / r.weight)
        })
        .collect();
    order.sort_by(|(a, ka), (b, kb)| {
        (b.enabled, b.priority)
            .cmp(&(a.enabled, a.priority))
            .then(ka.partial_cmp(kb).unwrap_or(std::cmp::Ordering::Equal))
    });
    let now_utc = crate::window::to_utc(now);
    let mut soonest: Option<Blocked> = None;
    for (r, _) in order.iter().take_while(|(r, _)| r.enabled) {
        let mut blocked: Option<Blocked> = None;
        for a in cache::policies_for(client, (None, None, None, Some(r.channel_id)), now) {
            let Some(amount) = metric_amount(&a.policy.metric, cost.clone(), Some(est), Some(max_out)) else {
                continue;
            };
            let Some(c) = counters.get_mut(&(a.policy.policy_id, a.scope_id)) else {
                return Routed::Single;
            };
            let (ws, we) = a.policy.window(now_utc);
            let used = used_locked(client, &a.policy, a.scope_id, ws, c);
            if refuses(&a.policy.boundary, a.effective_limit.clone(), used, c.reserved.clone(), amount) {
                if !a.policy.enforce {
                    return Routed::Single;
                }
                Blocked::by_cap(&mut blocked, client, a, (ws, we), now);
            }
        }
        match blocked {
            None => {
                let upstream = (r.base_url.clone(), r.api_key.clone(), r.upstream_model.clone());
                return Routed::To(route_to(out, r.channel_id, upstream));
            }
            Some(b) => Blocked::keep_soonest(&mut soonest, b),
        }
    }
    Routed::Refused(Box::new(unroutable(model, None, true, soonest, now)))
}

/// The insert of a batch's reservations (each row's hold arrays are its slice [lo:hi] of the flat
/// arrays $9-$12), as the CTE `filed`. A request id that a concurrent admit filed first (a retry
/// racing its first attempt: the insert waits for that one to commit) is not filed.
macro_rules! file_reservations {
    () => {
        "\
WITH filed AS (
    INSERT INTO quota.reservation (request_id, key_id, user_id, channel_id, model, counted_in_key_global,
                                   counted_in_user_global, est_input_tokens, max_output_tokens,
                                   hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    SELECT r.request_id, r.key_id, r.user_id, r.channel_id, r.model, r.in_key_global, r.in_user_global, r.est, r.max_out,
           ($9::bigint[])[r.lo:r.hi], ($10::bigint[])[r.lo:r.hi], ($11::numeric[])[r.lo:r.hi],
           ($12::numeric[])[r.lo:r.hi], $13
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::boolean[], $6::boolean[], $7::bigint[],
                $8::bigint[], $14::integer[], $15::integer[], $16::bigint[])
         AS r(request_id, key_id, user_id, model, in_key_global, in_user_global, est, max_out, lo, hi, channel_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, hold_policy, hold_scope, hold_amount
)"
    };
}

// Files reservations ahead of the counter locks (see file_ahead): returns the request ids filed.
const FILE_AHEAD: &str = concat!(file_reservations!(), "\nSELECT f.request_id FROM filed f");

// Writes what a batch's admits decided: the reservations of the admitted requests not filed yet,
// the removal of those filed ahead that were not admitted after all ($20), and each counter
// once, with the sum of the holds now filed on it (the ones filed here, and $21-$23: those of
// admitted requests filed ahead), rolling a stale window first ($17-$19: each counter's window).
// The counters are locked by the batch already. Returns the request ids filed here.
const FILE: &str = concat!(
    file_reservations!(),
    ", unfiled AS (
    DELETE FROM quota.reservation r WHERE r.request_id = ANY($20::text[])
), held AS (
    UPDATE quota.counter c SET
        used         = CASE WHEN c.window_start = w.window_start THEN c.used ELSE 0 END,
        window_start = w.window_start,
        reserved     = c.reserved + s.amount
    FROM (SELECT h.policy_id, h.scope_id, sum(h.amount) AS amount
          FROM (SELECT u.policy_id, u.scope_id, u.amount
                FROM filed f, unnest(f.hold_policy, f.hold_scope, f.hold_amount) AS u(policy_id, scope_id, amount)
                UNION ALL
                SELECT * FROM unnest($21::bigint[], $22::bigint[], $23::numeric[])) h
          GROUP BY h.policy_id, h.scope_id) s
    JOIN unnest($17::bigint[], $18::bigint[], $19::timestamptz[]) AS w(policy_id, scope_id, window_start)
      ON w.policy_id = s.policy_id AND w.scope_id = s.scope_id
    WHERE c.policy_id = s.policy_id AND c.scope_id = s.scope_id
)
SELECT f.request_id FROM filed f"
);

/// The arguments $1-$16 of file_reservations!() for these filings.
fn reservation_args(filings: &[Filing], now: TimestampWithTimeZone) -> Vec<DatumWithOid<'static>> {
    let (lo, hi) = slices(filings.iter().map(|f| f.holds.len()));
    let holds = || filings.iter().flat_map(|f| &f.holds);
    vec![
        filings.iter().map(|f| f.request_id.clone()).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.key_id).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.user_id).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.model.clone()).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.in_key_global).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.in_user_global).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.est).collect::<Vec<_>>().into(),
        filings.iter().map(|f| f.max_out).collect::<Vec<_>>().into(),
        holds().map(|h| h.0).collect::<Vec<_>>().into(),
        holds().map(|h| h.1).collect::<Vec<_>>().into(),
        holds().map(|h| h.2.clone()).collect::<Vec<_>>().into(),
        holds().map(|h| h.3.clone()).collect::<Vec<_>>().into(),
        now.into(),
        lo.into(),
        hi.into(),
        filings.iter().map(|f| f.channel_id).collect::<Vec<_>>().into(),
    ]
}

/// The reservation of a batch's admit that looks simply admissible on what the batch read before
/// locking anything (its key may be used, its model is priced and no channel serves it), with
/// the holds it would take: see [`file_ahead`]. None: it is decided before it is filed.
pub(super) fn filing_ahead(
    client: &mut SpiClient<'_>,
    item: usize,
    args: &Checked<'_>,
    key: Option<&KeyRow>,
    now: TimestampWithTimeZone,
) -> Option<Filing> {
    let key = key?;
    let plain = key.filed.is_none()
        && key.suspended_until.is_none()
        && !key.reused
        && key.cost.is_some()
        && key_refused(key.key_enabled, key.user_enabled, key.expires_at, now).is_none()
        && !cache::channels(client, args.model).served;
    if !plain {
        return None;
    }
    let own =
        cache::policies_for(client, (Some(key.key_id), Some(key.user_id), Some(args.model.to_string()), None), now);
    let (holds, iso_key, iso_user) = holds_for(own, &key.cost, args.est, args.max_out, crate::window::to_utc(now));
    Some(filing(item, args, (key.key_id, key.user_id), None, &holds, (iso_key, iso_user)))
}

/// A request's reservation as a batch files it.
fn filing(
    item: usize,
    args: &Checked<'_>,
    (key_id, user_id): (i64, i64),
    channel_id: Option<i64>,
    holds: &[Hold],
    (iso_key, iso_user): (bool, bool),
) -> Filing {
    Filing {
        item,
        channel_id,
        request_id: args.request_id.to_string(),
        key_id,
        user_id,
        model: args.model.to_string(),
        in_key_global: !iso_key,
        in_user_global: !iso_user,
        est: args.est,
        max_out: args.max_out,
        holds: holds
            .iter()
            .map(|h| {
                let cw = h.policy.counter_window(h.ws);
                (h.policy.policy_id, h.scope_id, h.amount.clone(), h.effective_limit.clone(), cw)
            })
            .collect(),
    }
}

impl Filing {
    /// Whether two filings of a request file the same reservation.
    pub(super) fn same(&self, other: &Filing) -> bool {
        self.channel_id == other.channel_id
            && self.in_key_global == other.in_key_global
            && self.in_user_global == other.in_user_global
            && self.holds == other.holds
    }
}

/// Files the reservations of a batch's admits ahead of locking its counters (their holds come
/// with the decisions: see [`file`]), so that the counters, which every batch of the same keys
/// waits for, stay locked for the decisions and the holds only. A reservation row is a
/// request's own, and first in the lock order. Returns the filings filed, by item (one whose
/// request id a concurrent admit filed first is not among them).
pub(super) fn file_ahead(
    client: &mut SpiClient<'_>,
    filings: Vec<Filing>,
    now: TimestampWithTimeZone,
) -> std::collections::HashMap<usize, Filing> {
    if filings.is_empty() {
        return std::collections::HashMap::new();
    }
    let filed: std::collections::HashSet<String> =
        run(client, FILE_AHEAD, &reservation_args(&filings, now)).map(|r| col::<String>(&r, 1).unwrap()).collect();
    filings.into_iter().filter(|f| filed.contains(&f.request_id)).map(|f| (f.item, f)).collect()
}

/// What a batch's admits have decided and not written yet (see FILE).
#[derive(Default)]
pub(super) struct Pending {
    /// admitted requests to file
    pub file: Vec<Filing>,
    /// admitted requests filed ahead: their holds to take
    pub held: Vec<Filing>,
    /// requests filed ahead and not admitted after all: their reservations to remove
    pub unfile: Vec<String>,
}

/// Writes what a batch's admits decided (FILE); returns the items of `pending.file` whose
/// request id a concurrent admit filed first (for the single call's path: a retry).
pub(super) fn file(client: &mut SpiClient<'_>, pending: Pending, now: TimestampWithTimeZone) -> Vec<usize> {
    if pending.file.is_empty() && pending.held.is_empty() && pending.unfile.is_empty() {
        return vec![];
    }
    let held = || pending.held.iter().flat_map(|f| &f.holds);
    // each counter's window (the same for every hold on it: the batch shares one clock)
    let mut windows: std::collections::HashMap<(i64, i64), TimestampWithTimeZone> = std::collections::HashMap::new();
    for (p, s, _, _, cw) in pending.file.iter().flat_map(|f| &f.holds).chain(held()) {
        windows.insert((*p, *s), *cw);
    }
    let mut args = reservation_args(&pending.file, now);
    args.extend([
        windows.keys().map(|k| k.0).collect::<Vec<_>>().into(),
        windows.keys().map(|k| k.1).collect::<Vec<_>>().into(),
        windows.values().copied().collect::<Vec<_>>().into(),
        pending.unfile.into(),
        held().map(|h| h.0).collect::<Vec<_>>().into(),
        held().map(|h| h.1).collect::<Vec<_>>().into(),
        held().map(|h| h.2.clone()).collect::<Vec<_>>().into(),
    ]);
    let filed: std::collections::HashSet<String> =
        run(client, FILE, &args).map(|r| col::<String>(&r, 1).unwrap()).collect();
    pending.file.iter().filter(|f| !filed.contains(&f.request_id)).map(|f| f.item).collect()
}
