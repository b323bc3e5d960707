//! Quota math with no PostgreSQL dependency, so plain unit and property tests cover it.
//!
//! * [`window`]: which span of time a policy's usage counts against ([`WindowSpec`], [`Window`]).
//! * [`policy`]: parsing and validation of the policy columns ([`Period`], [`WindowMode`],
//!   [`PolicyError`]).
//! * [`humanize`]: approximate durations in words for client messages.
#![forbid(unsafe_code)]

pub mod humanize;
pub mod policy;
pub mod window;

pub use humanize::approx_duration;
pub use policy::{
    parse_reset_hour, parse_time_zone, parse_week_start, Period, PolicyError, WindowMode,
};
pub use window::{Window, WindowSpec};
