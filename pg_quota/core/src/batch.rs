//! Batches of lifecycle calls (`quota.admit_many`, `quota.settle_many`): the rules that make a
//! batch behave like the same calls made one by one, in array order, and never deadlock.
//!
//! * **Lock plan.** A batch locks every counter it will touch once, up front, in the engine's
//!   global lock order: a channel's counters first, then by policy id, then by scope id (the
//!   order of `quota.lock_order`). Two batches, or a batch and a single call, that share
//!   counters then take them in the same order whatever the order of their items, so they
//!   queue instead of deadlocking; a hot key's counter is locked once per batch, not once per
//!   request. [`lock_plan`] turns the counters the items name, in any order and with repeats,
//!   into that plan.
//! * **Repeats.** A request id that an earlier item of the same batch names is refused for the
//!   later item (an admit's id names one request); [`repeats`] finds them.

use std::collections::HashSet;

/// A counter a batch will lock: a policy's counter for one scope (key, user or channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterRef {
    /// whether the policy is a channel's (channel counters come first in the lock order)
    pub channel: bool,
    pub policy_id: i64,
    pub scope_id: i64,
}

impl CounterRef {
    /// The global lock order as a sort key: channel counters first, then by policy id, then by
    /// scope id.
    pub fn lock_key(&self) -> (u8, i64, i64) {
        (u8::from(!self.channel), self.policy_id, self.scope_id)
    }
}

/// The counters to lock, each once, in the global lock order, with the value that the first
/// item naming it gave (the window a counter created now starts in: the same for every item of
/// a batch, which shares one clock).
pub fn lock_plan<T>(counters: impl IntoIterator<Item = (CounterRef, T)>) -> Vec<(CounterRef, T)> {
    let mut seen: HashSet<(i64, i64)> = HashSet::new();
    let mut plan: Vec<(CounterRef, T)> = counters
        .into_iter()
        .filter(|(c, _)| seen.insert((c.policy_id, c.scope_id)))
        .collect();
    // stable: equal keys cannot occur after the filter, so the order is total
    plan.sort_by_key(|(c, _)| c.lock_key());
    plan
}

/// For each item, whether an earlier item of the batch names the same request id (None: the
/// item names none, so it repeats nothing).
pub fn repeats<'a>(request_ids: impl IntoIterator<Item = Option<&'a str>>) -> Vec<bool> {
    let mut seen: HashSet<&'a str> = HashSet::new();
    request_ids
        .into_iter()
        .map(|id| id.is_some_and(|id| !seen.insert(id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter(channel: bool, policy_id: i64, scope_id: i64) -> CounterRef {
        CounterRef {
            channel,
            policy_id,
            scope_id,
        }
    }

    #[test]
    fn channel_counters_come_first_then_policy_then_scope() {
        let plan = lock_plan([
            (counter(false, 1, 7), ()),
            (counter(true, 9, 3), ()),
            (counter(false, 1, 2), ()),
            (counter(false, 1, 7), ()),
            (counter(true, 4, 3), ()),
        ]);
        let keys: Vec<_> = plan
            .iter()
            .map(|(c, _)| (c.channel, c.policy_id, c.scope_id))
            .collect();
        assert_eq!(
            keys,
            vec![(true, 4, 3), (true, 9, 3), (false, 1, 2), (false, 1, 7)]
        );
    }

    #[test]
    fn a_counter_named_twice_is_locked_once_with_the_first_value() {
        let plan = lock_plan([
            (counter(false, 5, 1), "first"),
            (counter(false, 5, 1), "second"),
        ]);
        assert_eq!(plan, vec![(counter(false, 5, 1), "first")]);
    }

    #[test]
    fn only_later_items_repeat_an_id() {
        let ids = [
            Some("a"),
            Some("b"),
            None,
            Some("a"),
            None,
            Some("b"),
            Some("a"),
        ];
        assert_eq!(
            repeats(ids),
            vec![false, false, false, true, false, true, true]
        );
    }

    fn counters() -> impl Strategy<Value = Vec<CounterRef>> {
        // a policy belongs to one subject type: its id decides whether it is a channel's
        prop::collection::vec((0i64..12, 0i64..6), 0..40).prop_map(|v| {
            v.into_iter()
                .map(|(p, s)| counter(p % 4 == 0, p, s))
                .collect()
        })
    }

    proptest! {
        /// Two batches naming the same counters, in any order and with any repeats, lock them
        /// in the same order (so they cannot deadlock), each exactly once, ascending.
        #[test]
        fn any_two_batches_over_the_same_counters_lock_in_one_order(
            a in counters(),
            shuffle in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut b = a.clone();
            for (i, ix) in shuffle.iter().enumerate() {
                if b.is_empty() { break; }
                let (n, j) = (b.len(), ix.index(b.len()));
                b.swap(i % n, j);
            }
            b.extend(a.iter().take(3).copied()); // repeats
            let plan_a: Vec<_> = lock_plan(a.iter().map(|c| (*c, ()))).into_iter().map(|(c, _)| c).collect();
            let plan_b: Vec<_> = lock_plan(b.iter().map(|c| (*c, ()))).into_iter().map(|(c, _)| c).collect();
            prop_assert_eq!(&plan_a, &plan_b);
            prop_assert!(plan_a.windows(2).all(|w| w[0].lock_key() < w[1].lock_key()));
            let distinct: HashSet<_> = a.iter().copied().collect();
            prop_assert_eq!(plan_a.len(), distinct.len());
        }

        #[test]
        fn an_item_repeats_exactly_when_an_earlier_one_has_its_id(
            ids in prop::collection::vec(prop::option::of(0u8..5), 0..30),
        ) {
            let names: Vec<Option<String>> = ids.iter().map(|i| i.map(|i| format!("req-{i}"))).collect();
            let got = repeats(names.iter().map(|n| n.as_deref()));
            for (i, n) in names.iter().enumerate() {
                let earlier = n.is_some() && names[..i].contains(n);
                prop_assert_eq!(got[i], earlier);
            }
        }
    }
}
