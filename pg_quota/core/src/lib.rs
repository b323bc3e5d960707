//! Quota math with no PostgreSQL dependency, so plain unit and property tests cover it.
//!
//! * [`window`]: which span of time a policy's usage counts against ([`WindowSpec`], [`Window`]).
//! * [`policy`]: parsing and validation of the policy columns ([`Period`], [`WindowMode`],
//!   [`PolicyError`]).
//! * [`pricing`]: which price a model name is charged at (snapshots and aliases).
//! * [`request`]: the bounds on what a client sends to admit and settle ([`InputError`]).
//! * [`batch`]: how a batch of lifecycle calls locks counters and finds repeated request ids.
//! * [`bounded`]: a map bounded in entries and bytes, for per-backend caches.
//! * [`humanize`]: approximate durations in words for client messages.
#![forbid(unsafe_code)]

pub mod batch;
pub mod bounded;
pub mod humanize;
pub mod policy;
pub mod pricing;
pub mod request;
pub mod window;

pub use bounded::BoundedMap;
pub use humanize::approx_duration;
pub use policy::{
    parse_reset_hour, parse_time_zone, parse_week_start, Period, PolicyError, WindowMode,
};
pub use request::InputError;
pub use window::{Window, WindowSpec};
