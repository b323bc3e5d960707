//! Alerts on the lifecycle's path (issue 20): budget thresholds crossed by settled usage, and
//! the would-be refusals of shadow policies (`quota.policy.enforce = false`). Both are events
//! written in the caller's transaction by SQL helpers (`sql/schema/70_alerts.sql`), once per
//! window under the counter row's lock that the caller already holds. Admit and settle call in
//! here from one line each; a policy without thresholds costs nothing.
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::{run, Policy};

const CROSS_THRESHOLDS: &str = "\
SELECT quota.cross_thresholds(p, $2, $3, $4, $5, $6, $7, $8) FROM quota.policy p WHERE p.policy_id = $1";

/// Logs the alert thresholds of `policy` that the settled usage `used` of its window starting at
/// `ws` has crossed against `limit` (the effective limit), each once per window
/// (quota.cross_thresholds). The counter row must be locked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_thresholds(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    (key_id, user_id): (i64, i64),
    ws: TimestampWithTimeZone,
    used: AnyNumeric,
    limit: AnyNumeric,
    now: TimestampWithTimeZone,
) {
    if policy.alert_at.is_empty() {
        return;
    }
    let args = [
        policy.policy_id.into(),
        scope_id.into(),
        key_id.into(),
        user_id.into(),
        ws.into(),
        used.into(),
        limit.into(),
        now.into(),
    ];
    run(client, CROSS_THRESHOLDS, &args);
}

const SHADOW_REFUSAL: &str = "SELECT quota.log_shadow_refusal($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// A shadow policy's window would have refused a request: logs a `shadow_refusal` event, once
/// per window (quota.log_shadow_refusal). `spent`: the window is spent (else a strict window
/// the estimate would overshoot). The counter row must be locked by the caller. `who` is None
/// for a channel's cap judged while routing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_shadow_refusal(
    client: &mut SpiClient<'_>,
    policy: &Policy,
    scope_id: i64,
    who: Option<(i64, i64)>,
    ws: TimestampWithTimeZone,
    (used, limit): (AnyNumeric, AnyNumeric),
    spent: bool,
    now: TimestampWithTimeZone,
) {
    let args = [
        policy.policy_id.into(),
        scope_id.into(),
        who.map(|w| w.0).into(),
        who.map(|w| w.1).into(),
        ws.into(),
        used.into(),
        limit.into(),
        if spent { "exhausted" } else { "would_exceed" }.into(),
        now.into(),
    ];
    run(client, SHADOW_REFUSAL, &args);
}
