//! `--fail-open`, bounded: while the database cannot be connected to, only keys the relay saw
//! admitted recently are forwarded without accounting, and only within a budget per outage
//! (requests and seconds), after which the relay fails closed until the database is back.
//! Load (a busy pool, slow calls) is never an outage: those requests get 503 `database_busy`.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::FailOpenConfig;

/// Keys remembered at most; when full, those not admitted within the window are forgotten
/// first, and a new key is not remembered until there is room.
const MAX_REMEMBERED_KEYS: usize = 100_000;

/// Why a request may not pass without accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    /// the key was not admitted within the window (or never)
    UnseenKey,
    /// this outage has used its requests or its seconds
    BudgetSpent,
}

pub struct FailOpen {
    config: FailOpenConfig,
    /// keyed by a hash of the API key (never the key itself): key id and last admit
    recent: Mutex<HashMap<u64, (i64, Instant)>>,
    hasher: RandomState,
    outage: Mutex<Option<Outage>>,
}

struct Outage {
    started: Instant,
    forwarded: u64,
}

impl FailOpen {
    pub fn new(config: FailOpenConfig) -> Self {
        FailOpen {
            config,
            recent: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            outage: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// An admit let `api_key` (key `key_id`) through: it may pass during the next outage.
    pub fn admitted(&self, api_key: &str, key_id: i64) {
        if !self.config.enabled {
            return;
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= MAX_REMEMBERED_KEYS {
            let window = self.config.recent;
            recent.retain(|_, (_, at)| now.duration_since(*at) < window);
        }
        let hash = self.hasher.hash_one(api_key);
        if recent.len() < MAX_REMEMBERED_KEYS || recent.contains_key(&hash) {
            recent.insert(hash, (key_id, now));
        }
    }

    /// The database answered: whatever outage there was is over.
    pub fn database_answered(&self) {
        if self.config.enabled {
            *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The database could not be connected to: may `api_key` pass without accounting? Passing
    /// uses one request of the outage's budget; the key's id is returned for the log.
    pub fn pass(&self, api_key: &str) -> Result<i64, Refusal> {
        if !self.config.enabled {
            return Err(Refusal::Disabled);
        }
        let now = Instant::now();
        let key_id = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            match recent.get(&self.hasher.hash_one(api_key)) {
                Some((key_id, at)) if now.duration_since(*at) < self.config.recent => *key_id,
                _ => return Err(Refusal::UnseenKey),
            }
        };
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        let outage = outage.get_or_insert(Outage {
            started: now,
            forwarded: 0,
        });
        if outage.forwarded >= self.config.max_requests
            || now.duration_since(outage.started) >= self.config.max_outage
        {
            return Err(Refusal::BudgetSpent);
        }
        outage.forwarded += 1;
        Ok(key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate(max_requests: u64, max_outage: Duration, recent: Duration) -> FailOpen {
        FailOpen::new(FailOpenConfig {
            enabled: true,
            recent,
            max_requests,
            max_outage,
        })
    }

    #[test]
    fn only_recently_admitted_keys_pass_and_only_within_the_budget() {
        let g = gate(2, Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(g.pass("sk-never-seen"), Err(Refusal::UnseenKey));
        g.admitted("sk-a", 7);
        assert_eq!(g.pass("sk-a"), Ok(7));
        assert_eq!(g.pass("sk-a"), Ok(7));
        assert_eq!(
            g.pass("sk-a"),
            Err(Refusal::BudgetSpent),
            "two requests per outage"
        );
        assert_eq!(g.pass("sk-b"), Err(Refusal::UnseenKey));
        // the database is back: the next outage has a budget of its own
        g.database_answered();
        assert_eq!(g.pass("sk-a"), Ok(7));
    }

    #[test]
    fn keys_seen_too_long_ago_and_long_outages_fail_closed() {
        let g = gate(100, Duration::from_secs(60), Duration::ZERO);
        g.admitted("sk-a", 1);
        assert_eq!(g.pass("sk-a"), Err(Refusal::UnseenKey), "not recent enough");
        let g = gate(100, Duration::ZERO, Duration::from_secs(60));
        g.admitted("sk-a", 1);
        assert_eq!(
            g.pass("sk-a"),
            Err(Refusal::BudgetSpent),
            "the outage lasted too long"
        );
        let off = FailOpen::new(FailOpenConfig {
            enabled: false,
            recent: Duration::from_secs(60),
            max_requests: 10,
            max_outage: Duration::from_secs(60),
        });
        off.admitted("sk-a", 1);
        assert_eq!(off.pass("sk-a"), Err(Refusal::Disabled));
    }
}
