//! SQL entry point over the pricing rule of `pg_quota_core::pricing` (`quota.price_for` applies it).
use pgrx::prelude::*;

/// The base names a model may be priced as, longest first (see `pg_quota_core::pricing`).
#[pg_extern(immutable, parallel_safe, strict)]
pub(crate) fn price_prefixes(model: &str) -> Vec<String> {
    pg_quota_core::pricing::price_prefixes(model)
        .into_iter()
        .map(String::from)
        .collect()
}
