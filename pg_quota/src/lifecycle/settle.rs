//! `quota.settle`: replace a reservation by the actual usage on every policy it held, write the
//! ledger row (its trigger keeps the daily rollup), apply exhaustion. Idempotent.
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::{alerts, cache};
use super::{
    clock, col, fail, first, mark_exhausted, metric_amount, recover_window, rolling_used, row, run, slices,
    EngineError, Policy, Recovered,
};
use pg_quota_core::batch::lock_plan;
use std::collections::HashMap;

/// The columns of `quota.settlement`, in order.
pub(super) struct Settlement {
    pub billed: bool,
    pub unbilled_reason: Option<String>,
    pub cost: AnyNumeric,
    pub replay: bool,
}

// Takes the reservations of a batch's settles (each request id once) and prices each one's
// actual usage, in one statement: per reservation taken, the ordinal of its settle in $1. Usage
// not given prices the reservation's estimate (the sweep's charge: see charge_expired; a settle
// without usage bills nothing, see counted).
const TAKE: &str = "\
WITH r AS (DELETE FROM quota.reservation r WHERE r.request_id = ANY($1) RETURNING r.*)
SELECT i.n, r.key_id, r.user_id, r.channel_id, r.model, r.counted_in_key_global, r.counted_in_user_global,
       r.hold_policy, r.hold_scope, r.hold_amount, r.hold_limit,
       quota.cost_of(mp, coalesce(i.input, r.est_input_tokens), coalesce(i.output, r.max_output_tokens), i.cached),
       (SELECT g.generation FROM quota.policy_generation g), r.est_input_tokens, r.max_output_tokens
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS i(request_id, input, output, cached, n)
JOIN r ON r.request_id = i.request_id
LEFT JOIN LATERAL quota.price_for(r.model) mp ON true";

// What the ledger says of a settled request (quota.ledger_request keeps it for the request id's
// horizon): the latest row's billing (a correction comes last), the cost of all its rows (a
// sweep's charge and its correction), and whether it is a sweep's charge not yet corrected.
macro_rules! settled_query {
    ($known_ids:literal) => {
        concat!(
            "\
SELECT (array_agg(l.billed ORDER BY l.settled_by = 'correction' DESC))[1],
       (array_agg(l.unbilled_reason ORDER BY l.settled_by = 'correction' DESC))[1],
       sum(l.cost), bool_or(l.settled_by = 'sweep') AND NOT bool_or(l.settled_by = 'correction')
FROM ",
            $known_ids,
            " l WHERE l.request_id = $1 HAVING count(*) > 0"
        )
    };
}
const SETTLED: &str = settled_query!("quota.ledger_request");
/// The same on a 0.1.0 schema (see cache::schema).
const SETTLED_0_1: &str = settled_query!("quota.usage_ledger");

const CORRECT_SWEPT: &str = "SELECT c.cost, c.billed FROM quota.correct_swept($1, $2, $3, $4, $5) c";

const RELEASED: &str = "\
SELECT r.kind, r.key_id, r.user_id, r.channel_id, r.model, quota.cost_of(mp, $2, $3, $4)
FROM quota.released r LEFT JOIN LATERAL quota.price_for(r.model) mp ON true WHERE r.request_id = $1";

// A reservation the sweep expired while the upstream was still working: the usage is real, so it
// is charged on the policies that apply now, with no hold left to release.
const LATE_HOLDS: &str = "\
SELECT (f.policy).policy_id, f.scope_id, f.effective_limit, (f.policy).exclusive AND f.axis = 'key',
       (f.policy).exclusive AND f.axis = 'user'
FROM quota.policies_for($1, $2, $3, $4, $5) f
ORDER BY quota.lock_order(f.axis, (f.policy).policy_id)";

// Writes the ledger rows of settles (each row's counted_* arrays are its slice [lo:hi] of the
// flat arrays $16-$19; the ledger's statement triggers add them to the day's rollups and to
// quota.ledger_request) and moves the holds to their windows' usage: each counter once, with
// the sums of the settles counting on it ($24 usage, $25 holds released), in the order given
// (the lock order), rolling a stale window first; $26 names who settles (settle, or the sweep).
// The ledger rows go in first, all of them (the count runs the whole insert before any counter
// is read; an EXISTS would run one row, and the rest at the statement's end), so the counter
// rows, which a busy key shares with every request, stay locked from their update to the commit
// and no longer; the rollup rows come after the counters (the triggers run at the statement's
// end), as the lock order wants. Rolling windows count in rolling_usage instead ($24 holds 0 for
// them, and $23, the counters' windows, -infinity: see Policy::counter_window). A counter
// deleted meanwhile (policy edited) is created again, with nothing reserved. Returns each
// counter's usage and how its window stands marked (marks!()).
const COUNT: &str = concat!(
    "\
WITH ledger AS (
    INSERT INTO quota.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_in_key_global, counted_in_user_global,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at,
                                    settled_by)
    SELECT l.request_id, l.key_id, l.user_id, l.channel_id, l.model, l.input, l.output, l.cached, l.cost,
           l.billed, l.unbilled_reason, l.in_key_global, l.in_user_global, ($16::bigint[])[l.lo:l.hi],
           ($17::bigint[])[l.lo:l.hi], ($18::timestamptz[])[l.lo:l.hi], ($19::numeric[])[l.lo:l.hi], $20, $26
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[], $7::bigint[],
                $8::bigint[], $9::numeric[], $10::boolean[], $11::text[], $12::boolean[], $13::boolean[],
                $14::integer[], $15::integer[])
         AS l(request_id, key_id, user_id, channel_id, model, input, output, cached, cost, billed,
              unbilled_reason, in_key_global, in_user_global, lo, hi)
    RETURNING 1
)
INSERT INTO quota.counter AS c (policy_id, scope_id, window_start, used)
SELECT * FROM unnest($21::bigint[], $22::bigint[], $23::timestamptz[], $24::numeric[])
WHERE (SELECT count(*) FROM ledger) > 0
ON CONFLICT (policy_id, scope_id) DO UPDATE SET
        ",
    roll_window!(),
    ",
        reserved     = c.reserved - (SELECT h.amount FROM unnest($21::bigint[], $22::bigint[], $25::numeric[])
                                       AS h(policy_id, scope_id, amount)
                                     WHERE h.policy_id = c.policy_id AND h.scope_id = c.scope_id)
RETURNING c.policy_id, c.scope_id, c.used, ",
    marks!()
);

const ROLLING_ADD: &str = "\
INSERT INTO quota.rolling_usage AS r (policy_id, scope_id, bucket, used)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::numeric[])
ON CONFLICT (policy_id, scope_id, bucket) DO UPDATE SET used = r.used + EXCLUDED.used";

/// A reservation being settled: whose it is and what it holds, in lock order.
struct Taken {
    key_id: i64,
    user_id: i64,
    channel_id: Option<i64>,
    model: String,
    counted_in_key_global: bool,
    counted_in_user_global: bool,
    hold_policy: Vec<i64>,
    hold_scope: Vec<i64>,
    hold_amount: Vec<AnyNumeric>,
    hold_limit: Vec<AnyNumeric>,
    cost: Option<AnyNumeric>,
    /// the reservation's estimate (est_input_tokens, max_output_tokens); none for a reservation
    /// the sweep released
    estimate: Option<(i64, i64)>,
}

#[pg_extern(sql = false)] // declared in sql/schema/40_lifecycle.sql
fn settle(
    request_id: Option<&str>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_tokens: Option<i64>,
) -> pgrx::composite_type!('static, "quota.settlement") {
    // a batch of one (quota.settle_many): one implementation of every rule
    let item = SettleItem { request_id, input_tokens, output_tokens, cached_tokens };
    let settled = Spi::connect_mut(|client| {
        settle_all(client, std::slice::from_ref(&item)).pop().expect("one settlement per item")
    });
    let s = match settled {
        Ok(s) => s,
        Err(e) => e.raise(),
    };
    row(
        c"settlement",
        [
            true.into_datum(),
            s.billed.into_datum(),
            s.unbilled_reason.into_datum(),
            s.cost.into_datum(),
            s.replay.into_datum(),
        ],
    )
}

/// The arguments of one settle.
pub(super) struct SettleItem<'a> {
    pub request_id: Option<&'a str>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
}

/// A held policy a settle counts on: its window, the amount it counts, the hold it releases.
struct Count {
    policy: Policy,
    scope_id: i64,
    hold: AnyNumeric,
    limit: AnyNumeric,
    ws: TimestampWithTimeZone,
    we: Option<TimestampWithTimeZone>,
    actual: AnyNumeric,
}

/// A settle with the reservation (or, late, the policies) it counts on: what it writes.
struct Counted<'a> {
    /// its item in the batch
    item: usize,
    request_id: &'a str,
    taken: Taken,
    usage: (Option<i64>, Option<i64>, i64),
    reason: Option<&'static str>,
    cost: Option<AnyNumeric>,
    counts: Vec<Count>,
}

type Answer = Result<Settlement, EngineError>;

/// Settles each item in array order, in the caller's transaction (`quota.settle` is a batch of
/// one). The reservations are taken in one statement; the settles that found theirs are
/// written together (see [`count`]) when the batch ends or when an item without one comes
/// (a repeat, a late settle, an unknown id: answered by [`not_reserved`] on what the items
/// before it wrote), so every item sees the ones before it, as one by one.
pub(super) fn settle_all(client: &mut SpiClient<'_>, items: &[SettleItem<'_>]) -> Vec<Answer> {
    let (now, now_utc) = clock();
    let mut answers: Vec<Option<Answer>> = (0..items.len()).map(|_| None).collect();
    // bounded before anything is read or written (pg_quota_core::request); the first item
    // naming a request id takes its reservation
    let mut takers: Vec<usize> = Vec::with_capacity(items.len());
    let mut named = std::collections::HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let id = item.request_id.unwrap_or("");
        match pg_quota_core::request::check_settle(id, item.input_tokens, item.output_tokens, item.cached_tokens) {
            Err(e) => answers[i] = Some(fail(b"PQ400", format!("settle: {e}"))),
            Ok(()) if named.insert(id) => takers.push(i),
            Ok(()) => {}
        }
    }
    let mut taken = take(client, items, &takers);
    let mut pending: Vec<Counted> = Vec::with_capacity(taken.len());
    for (i, item) in items.iter().enumerate() {
        if answers[i].is_some() {
            continue;
        }
        let request_id = item.request_id.unwrap_or("");
        let usage = (item.input_tokens, item.output_tokens, item.cached_tokens.unwrap_or(0));
        if let Some(t) = taken.remove(&i) {
            pending.push(counted(client, i, request_id, t, usage, now_utc));
            continue;
        }
        count(client, std::mem::take(&mut pending), now, "settle", &mut answers);
        match not_reserved(client, request_id, usage, now) {
            Ok(Ok(late)) => {
                let late = counted(client, i, request_id, late, usage, now_utc);
                count(client, vec![late], now, "settle", &mut answers)
            }
            Ok(Err(answer)) => answers[i] = Some(Ok(answer)),
            Err(e) => answers[i] = Some(Err(e)),
        }
    }
    count(client, pending, now, "settle", &mut answers);
    answers.into_iter().map(|a| a.expect("every item is answered")).collect()
}

/// Charges reservations that expired (quota.sweep, with pg_quota.expired_reservations =
/// 'charge') at their estimate: an unknown outcome is not free. By the settle's own code (take,
/// count): each hold moves to the usage of its policy's window now, as it was held (not priced
/// again), a window found ended spent is recovered, alert thresholds crossed are logged and a
/// window spent is marked and acted on; one ledger row per reservation, settled_by 'sweep', with
/// the estimate as its usage (a late settle corrects it: quota.correct_swept). A reservation
/// already gone (settled meanwhile) is skipped.
#[pg_extern(sql = false)] // declared in sql/schema/50_admin.sql
fn charge_expired(request_ids: Vec<Option<String>>, now_ts: TimestampWithTimeZone) {
    let items: Vec<SettleItem> = request_ids
        .iter()
        .map(|id| SettleItem {
            request_id: id.as_deref(),
            input_tokens: None,
            output_tokens: None,
            cached_tokens: Some(0),
        })
        .collect();
    let takers: Vec<usize> = (0..items.len()).collect();
    let now_utc = crate::window::to_utc(now_ts);
    Spi::connect_mut(|client| {
        let mut taken: Vec<(usize, Taken)> = take(client, &items, &takers).into_iter().collect();
        taken.sort_by_key(|(i, _)| *i);
        let mut batch: Vec<Counted> = Vec::with_capacity(taken.len());
        for (i, t) in taken {
            let (est, max_out) = t.estimate.expect("a reservation taken has its estimate");
            let mut charged =
                counted(client, i, items[i].request_id.unwrap_or(""), t, (Some(est), Some(max_out), 0), now_utc);
            for k in &mut charged.counts {
                k.actual = k.hold.clone();
            }
            batch.push(charged);
        }
        let mut answers: Vec<Option<Answer>> = (0..items.len()).map(|_| None).collect();
        count(client, batch, now_ts, "sweep", &mut answers);
    });
}

/// Takes the reservations of the items `takers` (see TAKE), by item.
fn take(client: &mut SpiClient<'_>, items: &[SettleItem<'_>], takers: &[usize]) -> HashMap<usize, Taken> {
    if takers.is_empty() {
        return HashMap::new();
    }
    let of = |f: fn(&SettleItem) -> Option<i64>| takers.iter().map(|&i| f(&items[i])).collect::<Vec<_>>();
    let args = [
        takers.iter().map(|&i| items[i].request_id).collect::<Vec<_>>().into(),
        of(|i| i.input_tokens).into(),
        of(|i| i.output_tokens).into(),
        of(|i| Some(i.cached_tokens.unwrap_or(0))).into(),
    ];
    let mut taken = HashMap::with_capacity(takers.len());
    let mut generation = None;
    for r in run(client, TAKE, &args) {
        let n = usize::try_from(col::<i64>(&r, 1).unwrap() - 1).expect("ordinals start at 1");
        generation = col::<i64>(&r, 13);
        taken.insert(
            takers[n],
            Taken {
                key_id: col(&r, 2).unwrap(),
                user_id: col(&r, 3).unwrap(),
                channel_id: col(&r, 4),
                model: col(&r, 5).unwrap(),
                counted_in_key_global: col(&r, 6).unwrap(),
                counted_in_user_global: col(&r, 7).unwrap(),
                hold_policy: col(&r, 8).unwrap(),
                hold_scope: col(&r, 9).unwrap(),
                hold_amount: col(&r, 10).unwrap(),
                hold_limit: col(&r, 11).unwrap(),
                cost: col(&r, 12),
                estimate: Some((col(&r, 14).unwrap(), col(&r, 15).unwrap())),
            },
        );
    }
    if let Some(g) = generation {
        cache::sync(g);
    }
    taken
}

/// What a settle counts: its billing, and on each held policy still there (one deleted
/// meanwhile took its counter with it) its current window and the amount it counts.
fn counted<'a>(
    client: &mut SpiClient<'_>,
    item: usize,
    request_id: &'a str,
    taken: Taken,
    usage: (Option<i64>, Option<i64>, i64),
    now_utc: chrono::DateTime<chrono::Utc>,
) -> Counted<'a> {
    let (input, output, _) = usage;
    let reason = if input.is_none() || output.is_none() {
        Some("usage_missing")
    } else if taken.cost.is_none() {
        Some("price_not_found")
    } else {
        None
    };
    let cost = if reason == Some("usage_missing") { None } else { taken.cost.clone() };
    let held = cache::policies_by_id(client, &taken.hold_policy);
    let mut counts: Vec<Count> = Vec::with_capacity(held.len());
    for (i, policy) in held.into_iter().enumerate() {
        let Some(policy) = policy else { continue };
        let (ws, we) = policy.window(now_utc);
        let actual = metric_amount(&policy.metric, cost.clone(), input, output).unwrap_or_else(|| AnyNumeric::from(0));
        counts.push(Count {
            policy,
            scope_id: taken.hold_scope[i],
            hold: taken.hold_amount[i].clone(),
            limit: taken.hold_limit[i].clone(),
            ws,
            we,
            actual,
        });
    }
    Counted { item, request_id, taken, usage, reason, cost, counts }
}

/// A counter that settles count on: the batch's sums on it, then (once written) its state.
struct Tally {
    policy: Policy,
    scope_id: i64,
    ws: TimestampWithTimeZone,
    actual: AnyNumeric,
    hold: AnyNumeric,
    /// settled usage of its window, before the batch (then after each item, as they are walked)
    used: AnyNumeric,
    /// marked spent in this window; marked in a window that has ended since
    marked: bool,
    ended_spent: bool,
}

/// Writes settles (see COUNT): all ledger rows in one statement, each counter once with the
/// batch's sums (and rolling windows' buckets likewise), then walks the items in order over
/// each counter's usage as it grows, for what is decided per request: a window found ended
/// spent is recovered, alert thresholds crossed are logged, and a window the usage spends is
/// marked (on_exhausted), each by the item that does it, as one by one.
fn count(
    client: &mut SpiClient<'_>,
    batch: Vec<Counted<'_>>,
    now: TimestampWithTimeZone,
    settled_by: &str,
    answers: &mut [Option<Answer>],
) {
    if batch.is_empty() {
        return;
    }
    let zero = AnyNumeric::from(0);
    // A rolling window counts in the minute's bucket: the ledger row names the bucket.
    let bucket = crate::window::to_pg(pg_quota_core::WindowSpec::bucket_of(crate::window::to_utc(now)));
    let mut tallies: HashMap<(i64, i64), Tally> = HashMap::new();
    for k in batch.iter().flat_map(|c| &c.counts) {
        let t = tallies.entry((k.policy.policy_id, k.scope_id)).or_insert_with(|| Tally {
            policy: k.policy.clone(),
            scope_id: k.scope_id,
            ws: k.ws,
            actual: zero.clone(),
            hold: zero.clone(),
            used: zero.clone(),
            marked: false,
            ended_spent: false,
        });
        t.actual = t.actual.clone() + k.actual.clone();
        t.hold = t.hold.clone() + k.hold.clone();
    }
    let order = lock_plan(tallies.values().map(|t| (t.policy.counter(t.scope_id), ())));
    let ordered: Vec<&Tally> = order.iter().map(|(c, _)| &tallies[&(c.policy_id, c.scope_id)]).collect();

    let (lo, hi) = slices(batch.iter().map(|c| c.counts.len()));
    let counts = || batch.iter().flat_map(|c| &c.counts);
    let args = [
        batch.iter().map(|c| c.request_id).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.key_id).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.user_id).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.channel_id).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.model.as_str()).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.usage.0.unwrap_or(0)).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.usage.1.unwrap_or(0)).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.usage.2).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.cost.clone().unwrap_or_else(|| zero.clone())).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.reason.is_none()).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.reason).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.counted_in_key_global).collect::<Vec<_>>().into(),
        batch.iter().map(|c| c.taken.counted_in_user_global).collect::<Vec<_>>().into(),
        lo.into(),
        hi.into(),
        counts().map(|k| k.policy.policy_id).collect::<Vec<_>>().into(),
        counts().map(|k| k.scope_id).collect::<Vec<_>>().into(),
        counts().map(|k| if k.policy.rolling() { bucket } else { k.ws }).collect::<Vec<_>>().into(),
        counts().map(|k| k.actual.clone()).collect::<Vec<_>>().into(),
        now.into(),
        ordered.iter().map(|t| t.policy.policy_id).collect::<Vec<_>>().into(),
        ordered.iter().map(|t| t.scope_id).collect::<Vec<_>>().into(),
        ordered.iter().map(|t| t.policy.counter_window(t.ws)).collect::<Vec<_>>().into(),
        ordered
            .iter()
            .map(|t| if t.policy.rolling() { zero.clone() } else { t.actual.clone() })
            .collect::<Vec<_>>()
            .into(),
        ordered.iter().map(|t| t.hold.clone()).collect::<Vec<_>>().into(),
        settled_by.into(),
    ];
    let written: Vec<((i64, i64), AnyNumeric, bool, bool)> = run(client, COUNT, &args)
        .map(|r| {
            ((col(&r, 1).unwrap(), col(&r, 2).unwrap()), col(&r, 3).unwrap(), col(&r, 4).unwrap(), col(&r, 5).unwrap())
        })
        .collect();
    assert_eq!(written.len(), tallies.len(), "pg_quota: one counter row per counter counted");

    let rolling: Vec<&Tally> = ordered.iter().copied().filter(|t| t.policy.rolling() && t.actual > zero).collect();
    if !rolling.is_empty() {
        let args = [
            rolling.iter().map(|t| t.policy.policy_id).collect::<Vec<_>>().into(),
            rolling.iter().map(|t| t.scope_id).collect::<Vec<_>>().into(),
            rolling.iter().map(|_| bucket).collect::<Vec<_>>().into(),
            rolling.iter().map(|t| t.actual.clone()).collect::<Vec<_>>().into(),
        ];
        run(client, ROLLING_ADD, &args);
    }
    // each counter's usage before the batch: after it, less the batch's
    for (key, used_after, marked, ended_spent) in written {
        let t = tallies.get_mut(&key).expect("a counter counted");
        let used_after =
            if t.policy.rolling() { rolling_used(client, t.policy.policy_id, t.scope_id, t.ws) } else { used_after };
        t.used = used_after - t.actual.clone();
        t.marked = marked;
        t.ended_spent = ended_spent;
    }

    for c in batch {
        let who = (c.taken.key_id, c.taken.user_id);
        for k in &c.counts {
            let t = tallies.get_mut(&(k.policy.policy_id, k.scope_id)).expect("a counter counted");
            if t.ended_spent {
                recover_window(client, &k.policy, k.scope_id, who, Recovered::WindowReset(k.ws), now);
                t.ended_spent = false;
            }
            t.used = t.used.clone() + k.actual.clone();
            alerts::cross_thresholds(client, &k.policy, k.scope_id, who, k.ws, t.used.clone(), k.limit.clone(), now);
            // a shadow policy never marks, logs or acts on a spent window (admit logs shadow_refusal)
            if t.used >= k.limit && !t.marked && k.policy.enforce {
                mark_exhausted(client, &k.policy, k.scope_id, who, (k.ws, k.we), now);
                t.marked = true;
            }
        }
        answers[c.item] = Some(Ok(Settlement {
            billed: c.reason.is_none(),
            unbilled_reason: c.reason.map(String::from),
            cost: c.cost.unwrap_or_else(|| zero.clone()),
            replay: false,
        }));
    }
}

/// No reservation for `request_id`: the earlier answer (inner Err) when it was settled; when the
/// sweep charged it at its reservation, the charge corrected to this measured usage (once:
/// quota.correct_swept); an error when it is unknown or refunded; and the policies that apply
/// now when the sweep released it (pg_quota.expired_reservations = 'release').
fn not_reserved(
    client: &mut SpiClient<'_>,
    request_id: &str,
    (input, output, cached): (Option<i64>, Option<i64>, i64),
    now: TimestampWithTimeZone,
) -> Result<Result<Taken, Settlement>, EngineError> {
    let settled = if cache::schema(client).ledger_request { SETTLED } else { SETTLED_0_1 };
    if let Some(l) = first(client, settled, &[request_id.into()]) {
        let uncorrected_sweep: bool = col(&l, 4).unwrap_or(false);
        if let (true, Some(input), Some(output)) = (uncorrected_sweep, input, output) {
            let args = [request_id.into(), input.into(), output.into(), cached.into(), now.into()];
            let corrected = first(client, CORRECT_SWEPT, &args)
                .and_then(|c| Some((col::<AnyNumeric>(&c, 1)?, col::<bool>(&c, 2)?)));
            if let Some((cost, billed)) = corrected {
                return Ok(Err(Settlement {
                    billed,
                    unbilled_reason: (!billed).then(|| "price_not_found".to_string()),
                    cost,
                    replay: false,
                }));
            }
        }
        // Settled before (or by a concurrent call that committed first): the same answer again.
        let l = first(client, settled, &[request_id.into()]).expect("the ledger has the request");
        let reason: Option<String> = col(&l, 2);
        return Ok(Err(Settlement {
            billed: col(&l, 1).unwrap(),
            unbilled_reason: reason,
            cost: col(&l, 3).unwrap(),
            replay: true,
        }));
    }
    let usage = [request_id.into(), input.into(), output.into(), cached.into()];
    let Some(r) = first(client, RELEASED, &usage) else {
        return fail(b"PQ404", format!("settle: unknown request_id {request_id}"));
    };
    let kind: String = col(&r, 1).unwrap();
    if kind == "refunded" {
        return fail(b"PQ409", format!("settle: request_id {request_id} was refunded and cannot be settled"));
    }
    cache::refresh(client);
    let mut taken = Taken {
        key_id: col(&r, 2).unwrap(),
        user_id: col(&r, 3).unwrap(),
        channel_id: col(&r, 4),
        model: col(&r, 5).unwrap(),
        counted_in_key_global: true,
        counted_in_user_global: true,
        hold_policy: vec![],
        hold_scope: vec![],
        hold_amount: vec![],
        hold_limit: vec![],
        cost: col(&r, 6),
        estimate: None,
    };
    let args =
        [taken.key_id.into(), taken.user_id.into(), taken.model.as_str().into(), taken.channel_id.into(), now.into()];
    for h in run(client, LATE_HOLDS, &args) {
        taken.hold_policy.push(col(&h, 1).unwrap());
        taken.hold_scope.push(col(&h, 2).unwrap());
        taken.hold_amount.push(AnyNumeric::from(0));
        taken.hold_limit.push(col(&h, 3).unwrap());
        taken.counted_in_key_global &= !col::<bool>(&h, 4).unwrap();
        taken.counted_in_user_global &= !col::<bool>(&h, 5).unwrap();
    }
    Ok(Ok(taken))
}
