//! Policy rows, policy selections and which models channels serve, kept per backend between
//! lifecycle calls.
//!
//! All are valid while `quota.policy_generation` holds the value they were read under: every
//! change to what `quota.policies_for` reads (policies, boosts, group memberships) or to the
//! models of channels sets a new,
//! never reused value in the same transaction, and each lifecycle call reads the value in its
//! first statement. A selection also depends on time through boosts, so it is kept only for
//! the span between the boost boundaries around the instant it was made.
use std::cell::RefCell;

use pg_quota_core::BoundedMap;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::AnyNumeric;

use super::{col, first, run, Policy};

/// One policy a request counts on (a row of quota.policies_for).
#[derive(Clone)]
pub(crate) struct Applicable {
    pub policy: Policy,
    pub scope_id: i64,
    pub axis: String,
    pub limit_key: String,
    pub effective_limit: AnyNumeric,
}

/// Who asks for which model through which channel: what a selection depends on, besides time.
pub(crate) type Subject = (Option<i64>, Option<i64>, Option<String>, Option<i64>);

struct Selection {
    /// valid for instants in [from, until); None: unbounded
    from: Option<i64>,
    until: Option<i64>,
    rows: Vec<Applicable>,
}

struct Cache {
    generation: i64,
    schema: Option<Schema>,
    policies: BoundedMap<i64, Option<Policy>>,
    selections: BoundedMap<Subject, Selection>,
    channels: BoundedMap<String, Channels>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            generation: 0,
            schema: None,
            policies: BoundedMap::new(MAX_ENTRIES, MAX_BYTES),
            selections: BoundedMap::new(MAX_ENTRIES, MAX_BYTES),
            channels: BoundedMap::new(MAX_ENTRIES, MAX_BYTES),
        }
    }
}

/// What the channels that serve a model, enabled or not, mean for admit.
#[derive(Clone, Copy)]
pub(crate) struct Channels {
    /// some channel serves it: admit routes (else the relay's default upstream takes it)
    pub served: bool,
    /// some such channel has a cap: routing locks its counters
    pub capped: bool,
}

/// Beyond this many entries, or this many bytes, a map starts over: a backend serves a bounded
/// working set (model names are at most 256 bytes, but a selection holds a row per policy).
const MAX_ENTRIES: usize = 10_000;
const MAX_BYTES: usize = 4 << 20;

/// What a policy row takes on the heap, roughly: its struct and its strings.
fn policy_bytes(p: &Policy) -> usize {
    std::mem::size_of::<Policy>()
        + p.subject_type.len()
        + p.metric.len()
        + p.window_mode.len()
        + p.boundary.len()
        + p.alert_at.len() * 32
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

const GENERATION: &str = "SELECT g.generation FROM quota.policy_generation g";

/// What the database's pg_quota schema has that this library's queries depend on. Between a
/// package upgrade and `ALTER EXTENSION pg_quota UPDATE`, the new library serves the old schema
/// (0.1.0: no quota.ledger_request; the ledger's primary key finds request ids). The upgrade
/// script sets a new generation, so connections look again after it.
#[derive(Clone, Copy)]
pub(crate) struct Schema {
    pub ledger_request: bool,
}

const SCHEMA: &str = "SELECT pg_catalog.to_regclass('quota.ledger_request') IS NOT NULL";

pub(crate) fn schema(client: &mut SpiClient<'_>) -> Schema {
    if let Some(s) = CACHE.with(|c| c.borrow().schema) {
        return s;
    }
    let row = first(client, SCHEMA, &[]).expect("a row");
    let s = Schema {
        ledger_request: col(&row, 1).unwrap_or(false),
    };
    CACHE.with(|c| c.borrow_mut().schema = Some(s));
    s
}

/// Reads the generation and forgets what was read under another (for a call whose first
/// statement does not read it).
pub(crate) fn refresh(client: &mut SpiClient<'_>) {
    let row = first(client, GENERATION, &[]).expect("quota.policy_generation has its row");
    sync(col(&row, 1).expect("generation is NOT NULL"));
}

/// Forgets everything read under another generation.
pub(crate) fn sync(generation: i64) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation != generation {
            *c = Cache {
                generation,
                ..Cache::default()
            };
        }
    });
}

const POLICIES: &str = concat!(
    "SELECT ",
    policy_columns!(),
    ", f.scope_id, f.axis, f.limit_key, f.effective_limit
FROM quota.policies_for($1, $2, $3, $4, $5) f, LATERAL (SELECT (f.policy).*) p
ORDER BY quota.lock_order(f.axis, p.policy_id)"
);

// The boost boundaries around $1: the selection made at $1 holds between them.
const BOOST_SPAN: &str = "\
SELECT max(b.t) FILTER (WHERE b.t <= $1), min(b.t) FILTER (WHERE b.t > $1)
FROM (SELECT starts_at AS t FROM quota.boost UNION ALL SELECT expires_at FROM quota.boost) b";

/// quota.policies_for(key, user, model, channel, at), in lock order.
pub(crate) fn policies_for(client: &mut SpiClient<'_>, subject: Subject, at: TimestampWithTimeZone) -> Vec<Applicable> {
    let now = at.into_inner();
    let cached = CACHE.with(|c| {
        let c = c.borrow();
        let s = c.selections.get(&subject)?;
        let valid = s.from.is_none_or(|f| f <= now) && s.until.is_none_or(|u| now < u);
        valid.then(|| s.rows.clone())
    });
    if let Some(rows) = cached {
        return rows;
    }
    let (key_id, user_id, model, channel_id) = subject.clone();
    let rows: Vec<Applicable> = run(
        client,
        POLICIES,
        &[
            key_id.into(),
            user_id.into(),
            model.into(),
            channel_id.into(),
            at.into(),
        ],
    )
    .map(|r| Applicable {
        policy: Policy::read(&r, 1),
        scope_id: col(&r, 15).unwrap(),
        axis: col(&r, 16).unwrap(),
        limit_key: col(&r, 17).unwrap(),
        effective_limit: col(&r, 18).unwrap(),
    })
    .collect();
    let span = first(client, BOOST_SPAN, &[at.into()]).expect("an aggregate returns a row");
    let from: Option<TimestampWithTimeZone> = col(&span, 1);
    let until: Option<TimestampWithTimeZone> = col(&span, 2);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        for a in &rows {
            c.policies.insert(a.policy.policy_id, Some(a.policy.clone()), policy_bytes(&a.policy));
        }
        let bytes = std::mem::size_of::<Subject>()
            + subject.2.as_ref().map_or(0, String::len)
            + rows
                .iter()
                .map(|a| policy_bytes(&a.policy) + a.axis.len() + a.limit_key.len() + 32)
                .sum::<usize>();
        let selection = Selection {
            from: from.map(|t| t.into_inner()),
            until: until.map(|t| t.into_inner()),
            rows: rows.clone(),
        };
        c.selections.insert(subject, selection, bytes);
    });
    rows
}

const POLICIES_BY_ID: &str = concat!(
    "SELECT ",
    policy_columns!(),
    " FROM quota.policy p WHERE p.policy_id = ANY($1)"
);

/// The policies with these ids, in the order given; None for one that no longer exists.
pub(crate) fn policies_by_id(client: &mut SpiClient<'_>, ids: &[i64]) -> Vec<Option<Policy>> {
    let missing: Vec<i64> = CACHE.with(|c| {
        ids.iter()
            .copied()
            .filter(|id| !c.borrow().policies.contains_key(id))
            .collect()
    });
    if !missing.is_empty() {
        let found: Vec<Policy> = run(client, POLICIES_BY_ID, &[missing.clone().into()])
            .map(|r| Policy::read(&r, 1))
            .collect();
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            for id in missing {
                let policy = found.iter().find(|p| p.policy_id == id).cloned();
                let bytes = policy.as_ref().map_or(16, policy_bytes);
                c.policies.insert(id, policy, bytes);
            }
        });
    }
    CACHE.with(|c| {
        let c = c.borrow();
        ids.iter().map(|id| c.policies.get(id).cloned().flatten()).collect()
    })
}

const CHANNELS: &str = "\
SELECT EXISTS (SELECT 1 FROM quota.channel_model cm WHERE cm.model = $1),
       EXISTS (SELECT 1 FROM quota.channel_model cm
               JOIN quota.policy p ON p.subject_type = 'channel' AND p.subject_id = cm.channel_id AND p.enabled
               WHERE cm.model = $1)";

/// The channels of `model` (see [`Channels`]).
pub(crate) fn channels(client: &mut SpiClient<'_>, model: &str) -> Channels {
    if let Some(known) = CACHE.with(|c| c.borrow().channels.get(model).copied()) {
        return known;
    }
    let (served, capped) = first(client, CHANNELS, &[model.into()])
        .map(|r| (col(&r, 1).unwrap_or(false), col(&r, 2).unwrap_or(false)))
        .unwrap_or((false, false));
    let found = Channels { served, capped };
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.channels.insert(model.to_string(), found, model.len() + 48);
    });
    found
}
