//! `quota.settle`: replace a reservation by the actual usage on every policy it held, write the
//! ledger row (its trigger keeps the daily rollup), apply exhaustion. Idempotent.
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::{alerts, cache};
use super::{
    clock, col, fail, first, mark_exhausted, metric_amount, recover_window, rolling_used, row, run, EngineError,
    Policy, Recovered,
};

/// The columns of `quota.settlement`, in order.
pub(super) struct Settlement {
    pub billed: bool,
    pub unbilled_reason: Option<String>,
    pub cost: AnyNumeric,
    pub replay: bool,
}

// Takes the reservation and prices the actual usage in one statement.
const TAKE: &str = "\
WITH r AS (DELETE FROM quota.reservation r WHERE r.request_id = $1 RETURNING r.*)
SELECT r.key_id, r.user_id, r.channel_id, r.model, r.counted_in_key_global, r.counted_in_user_global,
       r.hold_policy, r.hold_scope, r.hold_amount, r.hold_limit, quota.cost_of(mp, $2, $3, $4),
       (SELECT g.generation FROM quota.policy_generation g)
FROM r LEFT JOIN LATERAL quota.price_for(r.model) mp ON true";

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

// Writes the ledger row (its trigger adds it to the day's rollup) and moves each hold to its
// window's usage, rolling a stale window first, in the order given (the lock order). The ledger
// row goes in first (the EXISTS runs it before any counter is read), so the counter rows, which
// a busy key shares with every request, stay locked from their update to the commit and no
// longer. Rolling windows count in rolling_usage instead ($19 holds 0 for them, and $21, the
// counters' windows, -infinity: see Policy::counter_window). A counter deleted meanwhile
// (policy edited) is created again, with nothing reserved. A request counts on a policy at most
// once, so a policy id finds its hold. Returns each counter's usage and how its window stands
// marked (marks!()).
const COUNT: &str = concat!(
    "\
WITH ledger AS (
    INSERT INTO quota.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_in_key_global, counted_in_user_global,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
    RETURNING 1
)
INSERT INTO quota.counter AS c (policy_id, scope_id, window_start, used)
SELECT * FROM unnest($14::bigint[], $15::bigint[], $21::timestamptz[], $19::numeric[])
WHERE EXISTS (SELECT FROM ledger)
ON CONFLICT (policy_id, scope_id) DO UPDATE SET
        ",
    roll_window!(),
    ",
        reserved     = c.reserved - ($20::numeric[])[array_position($14::bigint[], c.policy_id)]
RETURNING c.policy_id, c.used, ",
    marks!()
);

const ROLLING_ADD: &str = "\
INSERT INTO quota.rolling_usage AS r (policy_id, scope_id, bucket, used) VALUES ($1, $2, $3, $4)
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
}

#[pg_extern(sql = false)] // declared in sql/schema/40_lifecycle.sql
fn settle(
    request_id: Option<&str>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_tokens: Option<i64>,
) -> pgrx::composite_type!('static, "quota.settlement") {
    // a batch of one (quota.settle_many): one implementation of every rule
    let item = SettleItem {
        request_id,
        input_tokens,
        output_tokens,
        cached_tokens,
    };
    let settled = Spi::connect_mut(|client| {
        super::batch::settle_each(client, std::slice::from_ref(&item))
            .pop()
            .expect("one settlement per item")
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

/// One settle, in the caller's transaction: its arguments checked, then settled (the
/// reservation and counters it touches may be locked already, by its batch).
pub(super) fn settle_item(client: &mut SpiClient<'_>, item: &SettleItem<'_>) -> Result<Settlement, EngineError> {
    let request_id = item.request_id.unwrap_or("");
    let (input, output, cached) = (item.input_tokens, item.output_tokens, item.cached_tokens);
    // bounded before anything is read or written (pg_quota_core::request)
    if let Err(e) = pg_quota_core::request::check_settle(request_id, input, output, cached) {
        return fail(b"PQ400", format!("settle: {e}"));
    }
    settle_in(client, request_id, input, output, cached.unwrap_or(0))
}

fn settle_in(
    client: &mut SpiClient<'_>,
    request_id: &str,
    input: Option<i64>,
    output: Option<i64>,
    cached: i64,
) -> Result<Settlement, EngineError> {
    let (now, now_utc) = clock();
    let usage: [DatumWithOid; 4] = [request_id.into(), input.into(), output.into(), cached.into()];
    let taken = match first(client, TAKE, &usage) {
        Some(r) => {
            cache::sync(col(&r, 12).expect("generation is NOT NULL"));
            Taken {
                key_id: col(&r, 1).unwrap(),
                user_id: col(&r, 2).unwrap(),
                channel_id: col(&r, 3),
                model: col(&r, 4).unwrap(),
                counted_in_key_global: col(&r, 5).unwrap(),
                counted_in_user_global: col(&r, 6).unwrap(),
                hold_policy: col(&r, 7).unwrap(),
                hold_scope: col(&r, 8).unwrap(),
                hold_amount: col(&r, 9).unwrap(),
                hold_limit: col(&r, 10).unwrap(),
                cost: col(&r, 11),
            }
        }
        None => match not_reserved(client, request_id, &usage, (input, output, cached), now)? {
            Ok(taken) => taken,
            Err(replay) => return Ok(replay),
        },
    };

    let reason = if input.is_none() || output.is_none() {
        Some("usage_missing")
    } else if taken.cost.is_none() {
        Some("price_not_found")
    } else {
        None
    };
    let cost = if reason == Some("usage_missing") {
        None
    } else {
        taken.cost.clone()
    };

    // The held policies still there (one deleted meanwhile took its counter with it), each with
    // its current window and the amount it counts.
    let held = cache::policies_by_id(client, &taken.hold_policy);
    struct Count {
        policy: Policy,
        scope_id: i64,
        hold: AnyNumeric,
        limit: AnyNumeric,
        ws: TimestampWithTimeZone,
        we: Option<TimestampWithTimeZone>,
        actual: AnyNumeric,
    }
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

    let zero = AnyNumeric::from(0);
    // A rolling window counts in the minute's bucket: the ledger row names the bucket.
    let bucket = crate::window::to_pg(pg_quota_core::WindowSpec::bucket_of(now_utc));
    let rows: Vec<(i64, AnyNumeric, bool, bool)> = run(
        client,
        COUNT,
        &[
            request_id.into(),
            taken.key_id.into(),
            taken.user_id.into(),
            taken.channel_id.into(),
            taken.model.as_str().into(),
            input.unwrap_or(0).into(),
            output.unwrap_or(0).into(),
            cached.into(),
            cost.clone().unwrap_or_else(|| zero.clone()).into(),
            reason.is_none().into(),
            reason.into(),
            taken.counted_in_key_global.into(),
            taken.counted_in_user_global.into(),
            counts.iter().map(|c| c.policy.policy_id).collect::<Vec<_>>().into(),
            counts.iter().map(|c| c.scope_id).collect::<Vec<_>>().into(),
            counts
                .iter()
                .map(|c| if c.policy.rolling() { bucket } else { c.ws })
                .collect::<Vec<_>>()
                .into(),
            counts.iter().map(|c| c.actual.clone()).collect::<Vec<_>>().into(),
            now.into(),
            counts
                .iter()
                .map(|c| {
                    if c.policy.rolling() {
                        zero.clone()
                    } else {
                        c.actual.clone()
                    }
                })
                .collect::<Vec<_>>()
                .into(),
            counts.iter().map(|c| c.hold.clone()).collect::<Vec<_>>().into(),
            counts
                .iter()
                .map(|c| c.policy.counter_window(c.ws))
                .collect::<Vec<_>>()
                .into(),
        ],
    )
    .map(|r| {
        (
            col(&r, 1).unwrap(),
            col(&r, 2).unwrap(),
            col(&r, 3).unwrap(),
            col(&r, 4).unwrap(),
        )
    })
    .collect();
    assert_eq!(rows.len(), counts.len(), "pg_quota: one counter row per hold");

    let who = (taken.key_id, taken.user_id);
    for (c, (counter_policy, counter_used, already_exhausted, ended_spent)) in counts.into_iter().zip(rows) {
        assert_eq!(
            counter_policy, c.policy.policy_id,
            "pg_quota: counters come back in hold order"
        );
        if ended_spent {
            let why = Recovered::WindowReset(c.ws);
            recover_window(client, &c.policy, c.scope_id, who, why, now);
        }
        let mut used = counter_used;
        if c.policy.rolling() {
            if c.actual > zero {
                let args = [
                    c.policy.policy_id.into(),
                    c.scope_id.into(),
                    bucket.into(),
                    c.actual.clone().into(),
                ];
                run(client, ROLLING_ADD, &args);
            }
            used = rolling_used(client, c.policy.policy_id, c.scope_id, c.ws);
        }
        alerts::cross_thresholds(client, &c.policy, c.scope_id, who, c.ws, used.clone(), c.limit.clone(), now);
        // a shadow policy never marks, logs or acts on a spent window (admit logs shadow_refusal)
        if used >= c.limit && !already_exhausted && c.policy.enforce {
            mark_exhausted(client, &c.policy, c.scope_id, who, (c.ws, c.we), now);
        }
    }

    Ok(Settlement {
        billed: reason.is_none(),
        unbilled_reason: reason.map(String::from),
        cost: cost.unwrap_or_else(|| AnyNumeric::from(0)),
        replay: false,
    })
}

/// No reservation for `request_id`: the earlier answer (inner Err) when it was settled; when the
/// sweep charged it at its reservation, the charge corrected to this measured usage (once:
/// quota.correct_swept); an error when it is unknown or refunded; and the policies that apply
/// now when the sweep released it (pg_quota.expired_reservations = 'release').
fn not_reserved(
    client: &mut SpiClient<'_>,
    request_id: &str,
    usage: &[DatumWithOid],
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
    let Some(r) = first(client, RELEASED, usage) else {
        return fail(b"PQ404", format!("settle: unknown request_id {request_id}"));
    };
    let kind: String = col(&r, 1).unwrap();
    if kind == "refunded" {
        return fail(
            b"PQ409",
            format!("settle: request_id {request_id} was refunded and cannot be settled"),
        );
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
    };
    let args = [
        taken.key_id.into(),
        taken.user_id.into(),
        taken.model.as_str().into(),
        taken.channel_id.into(),
        now.into(),
    ];
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
