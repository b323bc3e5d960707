//! Parsing and validation of the `quota.policy` columns that shape a window.
//!
//! Every error names the offending column in [`PolicyError::field`] so the SQL layer can refuse
//! an INSERT/UPDATE with a message a DBA can act on.

use std::fmt;

use chrono::{DateTime, Utc, Weekday};
use chrono_tz::Tz;

use crate::window::WindowSpec;

/// A policy row that cannot be used, with the column at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The `quota.policy` column the problem is about, e.g. `"period_minutes"`.
    pub field: &'static str,
    /// Plain-English explanation, including the offending value where it helps.
    pub message: String,
}

impl PolicyError {
    fn new(field: &'static str, message: impl Into<String>) -> PolicyError {
        PolicyError {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy: {}: {}", self.field, self.message)
    }
}

impl std::error::Error for PolicyError {}

/// How long a quota window is.
///
/// * `FiveHours` and `Minutes(n)` are absolute durations (5 h, n min), independent of time zone.
/// * `Day`, `Week` and `Month` are local-calendar periods in the policy's time zone, so a day
///   can last 23 or 25 hours across a DST change.
/// * `Total` never resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    FiveHours,
    Day,
    Week,
    Month,
    /// A custom length in minutes; always >= 1 when built by [`Period::parse`].
    Minutes(u32),
    Total,
}

impl Period {
    /// Parses the `period` and `period_minutes` columns together.
    ///
    /// Values are case-sensitive and must be exactly one of `5h`, `day`, `week`, `month`,
    /// `minutes`, `total`. `period_minutes` is required (>= 1) for `minutes` and must be NULL
    /// for every other period, so a stored row never carries a misleading length.
    pub fn parse(period: &str, period_minutes: Option<i32>) -> Result<Period, PolicyError> {
        let parsed = match period {
            "5h" => Period::FiveHours,
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "total" => Period::Total,
            "minutes" => return Self::parse_minutes(period_minutes),
            other => {
                return Err(PolicyError::new(
                    "period",
                    format!(
                        "unknown period '{other}'; expected one of '5h', 'day', 'week', \
                         'month', 'minutes', 'total'"
                    ),
                ))
            }
        };
        match period_minutes {
            None => Ok(parsed),
            Some(n) => Err(PolicyError::new(
                "period_minutes",
                format!("must be NULL unless period is 'minutes' (got {n} with period '{period}')"),
            )),
        }
    }

    fn parse_minutes(period_minutes: Option<i32>) -> Result<Period, PolicyError> {
        match period_minutes {
            None => Err(PolicyError::new(
                "period_minutes",
                "is required for period 'minutes' (the window length in minutes)",
            )),
            Some(n) if n >= 1 => Ok(Period::Minutes(n.unsigned_abs())),
            Some(n) => Err(PolicyError::new(
                "period_minutes",
                format!("must be at least 1 (got {n}); a window of at least one minute is needed"),
            )),
        }
    }

    /// The `period` column value for this period.
    pub fn as_str(&self) -> &'static str {
        match self {
            Period::FiveHours => "5h",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Minutes(_) => "minutes",
            Period::Total => "total",
        }
    }

    /// The `period_minutes` column value for this period (NULL except for `minutes`).
    pub fn period_minutes(&self) -> Option<i32> {
        match self {
            // parse() only builds values <= i32::MAX; saturate for hand-built ones.
            Period::Minutes(n) => Some(i32::try_from(*n).unwrap_or(i32::MAX)),
            _ => None,
        }
    }
}

/// Whether a window resets at fixed boundaries or slides with the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowMode {
    /// Anchored windows that reset at boundaries (`fixed`).
    Fixed,
    /// A sliding window ending now (`rolling`); it never "resets" as a whole.
    Rolling,
}

impl WindowMode {
    /// Parses the `window_mode` column: exactly `fixed` or `rolling`.
    pub fn parse(s: &str) -> Result<WindowMode, PolicyError> {
        match s {
            "fixed" => Ok(WindowMode::Fixed),
            "rolling" => Ok(WindowMode::Rolling),
            other => Err(PolicyError::new(
                "window_mode",
                format!("unknown window mode '{other}'; expected 'fixed' or 'rolling'"),
            )),
        }
    }

    /// The `window_mode` column value.
    pub fn as_str(&self) -> &'static str {
        match self {
            WindowMode::Fixed => "fixed",
            WindowMode::Rolling => "rolling",
        }
    }
}

/// Parses the `time_zone` column. Only IANA zone names (as in the tz database, e.g.
/// `Europe/Berlin`, `UTC`) are accepted; names are case-sensitive and numeric offsets such as
/// `+02:00` are refused, because a fixed offset cannot follow DST.
pub fn parse_time_zone(tz: &str) -> Result<Tz, PolicyError> {
    tz.parse::<Tz>().map_err(|_| {
        PolicyError::new(
            "time_zone",
            format!(
                "unknown time zone '{tz}'; use an IANA time zone name such as 'UTC', \
                 'Europe/Berlin' or 'America/New_York'"
            ),
        )
    })
}

/// Parses the `week_start` column: ISO weekday number, 1 = Monday … 7 = Sunday.
pub fn parse_week_start(week_start: i32) -> Result<Weekday, PolicyError> {
    u8::try_from(week_start)
        .ok()
        .and_then(|n| Weekday::try_from(n.wrapping_sub(1)).ok())
        .ok_or_else(|| {
            PolicyError::new(
                "week_start",
                format!("must be an ISO weekday from 1 (Monday) to 7 (Sunday), got {week_start}"),
            )
        })
}

/// Parses the `reset_hour` column: the local hour (0–23) at which day/week/month windows start.
pub fn parse_reset_hour(reset_hour: i32) -> Result<u32, PolicyError> {
    u32::try_from(reset_hour)
        .ok()
        .filter(|h| *h <= 23)
        .ok_or_else(|| {
            PolicyError::new(
                "reset_hour",
                format!("must be an hour of the day from 0 to 23, got {reset_hour}"),
            )
        })
}

impl WindowSpec {
    /// Validating constructor from raw column values, as the SQL layer has them.
    ///
    /// Columns are checked in this order and the first problem is reported: `period`,
    /// `period_minutes`, `window_mode` (rolling is refused for `total`, which has no length),
    /// `time_zone`, `week_start`, `reset_hour`. `time_zone`, `week_start` and `reset_hour` are
    /// validated for every period even where they do not matter (5h, minutes, total), so that
    /// a row is never stored with a value that would break if its period were changed.
    pub fn from_columns(
        period: &str,
        period_minutes: Option<i32>,
        window_mode: &str,
        anchor: DateTime<Utc>,
        time_zone: &str,
        week_start: i32,
        reset_hour: i32,
    ) -> Result<WindowSpec, PolicyError> {
        let period = Period::parse(period, period_minutes)?;
        let mode = WindowMode::parse(window_mode)?;
        if period == Period::Total && mode == WindowMode::Rolling {
            return Err(PolicyError::new(
                "window_mode",
                "'rolling' is not possible with period 'total' (a total never resets); \
                 use 'fixed'",
            ));
        }
        Ok(WindowSpec {
            period,
            mode,
            anchor,
            tz: parse_time_zone(time_zone)?,
            week_start: parse_week_start(week_start)?,
            reset_hour: parse_reset_hour(reset_hour)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor() -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600, 0).unwrap() // 2026-01-01T00:00:00Z
    }

    fn spec(
        period: &str,
        minutes: Option<i32>,
        mode: &str,
        tz: &str,
        week_start: i32,
        reset_hour: i32,
    ) -> Result<WindowSpec, PolicyError> {
        WindowSpec::from_columns(period, minutes, mode, anchor(), tz, week_start, reset_hour)
    }

    fn field_of(r: Result<WindowSpec, PolicyError>) -> &'static str {
        r.expect_err("expected a validation error").field
    }

    #[test]
    fn parses_every_period_and_round_trips_as_str() {
        for (s, p) in [
            ("5h", Period::FiveHours),
            ("day", Period::Day),
            ("week", Period::Week),
            ("month", Period::Month),
            ("total", Period::Total),
        ] {
            assert_eq!(Period::parse(s, None), Ok(p));
            assert_eq!(p.as_str(), s);
            assert_eq!(p.period_minutes(), None);
        }
        let m = Period::parse("minutes", Some(90)).unwrap();
        assert_eq!(m, Period::Minutes(90));
        assert_eq!(m.as_str(), "minutes");
        assert_eq!(m.period_minutes(), Some(90));
    }

    #[test]
    fn unknown_period_names_the_period_column() {
        for bad in ["hour", "Day", "", " day", "5H"] {
            let e = Period::parse(bad, None).unwrap_err();
            assert_eq!(e.field, "period");
            assert!(e.message.contains(&format!("'{bad}'")), "{}", e.message);
        }
    }

    #[test]
    fn minutes_requires_period_minutes() {
        let e = Period::parse("minutes", None).unwrap_err();
        assert_eq!(e.field, "period_minutes");
        assert!(
            e.message.contains("required for period 'minutes'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn period_minutes_must_be_positive() {
        for bad in [0, -1, i32::MIN] {
            let e = Period::parse("minutes", Some(bad)).unwrap_err();
            assert_eq!(e.field, "period_minutes");
            assert!(e.message.contains("at least one minute"), "{}", e.message);
        }
        assert_eq!(Period::parse("minutes", Some(1)), Ok(Period::Minutes(1)));
        assert_eq!(
            Period::parse("minutes", Some(i32::MAX)),
            Ok(Period::Minutes(i32::MAX as u32))
        );
    }

    #[test]
    fn period_minutes_must_be_null_for_other_periods() {
        for p in ["5h", "day", "week", "month", "total"] {
            let e = Period::parse(p, Some(30)).unwrap_err();
            assert_eq!(e.field, "period_minutes");
            assert!(e.message.contains("NULL"), "{}", e.message);
        }
    }

    #[test]
    fn window_mode_parsing() {
        assert_eq!(WindowMode::parse("fixed"), Ok(WindowMode::Fixed));
        assert_eq!(WindowMode::parse("rolling"), Ok(WindowMode::Rolling));
        assert_eq!(WindowMode::Fixed.as_str(), "fixed");
        assert_eq!(WindowMode::Rolling.as_str(), "rolling");
        let e = WindowMode::parse("sliding").unwrap_err();
        assert_eq!(e.field, "window_mode");
        assert!(e.message.contains("'sliding'"));
    }

    #[test]
    fn time_zone_must_be_iana() {
        assert_eq!(
            parse_time_zone("Europe/Berlin"),
            Ok(chrono_tz::Europe::Berlin)
        );
        assert_eq!(parse_time_zone("UTC"), Ok(chrono_tz::UTC));
        for bad in ["Mars/Olympus", "+02:00", "", "europe/berlin", "UTC+3"] {
            let e = parse_time_zone(bad).unwrap_err();
            assert_eq!(e.field, "time_zone");
            assert!(e.message.contains(&format!("'{bad}'")), "{}", e.message);
        }
    }

    #[test]
    fn week_start_is_iso() {
        assert_eq!(parse_week_start(1), Ok(Weekday::Mon));
        assert_eq!(parse_week_start(3), Ok(Weekday::Wed));
        assert_eq!(parse_week_start(7), Ok(Weekday::Sun));
        for bad in [0, 8, -1, 256 + 1, i32::MAX] {
            assert_eq!(
                parse_week_start(bad).unwrap_err().field,
                "week_start",
                "{bad}"
            );
        }
    }

    #[test]
    fn reset_hour_is_0_to_23() {
        assert_eq!(parse_reset_hour(0), Ok(0));
        assert_eq!(parse_reset_hour(23), Ok(23));
        for bad in [-1, 24, i32::MIN] {
            assert_eq!(
                parse_reset_hour(bad).unwrap_err().field,
                "reset_hour",
                "{bad}"
            );
        }
    }

    #[test]
    fn from_columns_names_the_field_of_every_error() {
        assert_eq!(
            field_of(spec("fortnight", None, "fixed", "UTC", 1, 0)),
            "period"
        );
        assert_eq!(
            field_of(spec("minutes", None, "fixed", "UTC", 1, 0)),
            "period_minutes"
        );
        assert_eq!(
            field_of(spec("minutes", Some(0), "fixed", "UTC", 1, 0)),
            "period_minutes"
        );
        assert_eq!(
            field_of(spec("day", Some(5), "fixed", "UTC", 1, 0)),
            "period_minutes"
        );
        assert_eq!(
            field_of(spec("day", None, "tumbling", "UTC", 1, 0)),
            "window_mode"
        );
        assert_eq!(
            field_of(spec("total", None, "rolling", "UTC", 1, 0)),
            "window_mode"
        );
        assert_eq!(
            field_of(spec("day", None, "fixed", "Nowhere/Land", 1, 0)),
            "time_zone"
        );
        assert_eq!(
            field_of(spec("week", None, "fixed", "UTC", 0, 0)),
            "week_start"
        );
        assert_eq!(
            field_of(spec("week", None, "fixed", "UTC", 8, 0)),
            "week_start"
        );
        assert_eq!(
            field_of(spec("day", None, "fixed", "UTC", 1, 24)),
            "reset_hour"
        );
        assert_eq!(
            field_of(spec("day", None, "fixed", "UTC", 1, -1)),
            "reset_hour"
        );
    }

    #[test]
    fn rolling_total_message_is_explicit() {
        let e = spec("total", None, "rolling", "UTC", 1, 0).unwrap_err();
        assert!(
            e.message.contains("'rolling'") && e.message.contains("'total'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn from_columns_builds_the_spec() {
        let s = spec("minutes", Some(90), "rolling", "Asia/Tokyo", 7, 6).unwrap();
        assert_eq!(
            s,
            WindowSpec {
                period: Period::Minutes(90),
                mode: WindowMode::Rolling,
                anchor: anchor(),
                tz: chrono_tz::Asia::Tokyo,
                week_start: Weekday::Sun,
                reset_hour: 6,
            }
        );
    }

    #[test]
    fn display_has_the_documented_shape() {
        let e = Period::parse("minutes", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("invalid policy: period_minutes: {}", e.message)
        );
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed
            .to_string()
            .starts_with("invalid policy: period_minutes: "));
    }
}
