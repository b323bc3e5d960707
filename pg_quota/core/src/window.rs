//! Quota windows: which span of time a policy's usage counts against at a given instant.
//!
//! Product rules (DESIGN.md, "Windows and policies"):
//!
//! * **`5h` and `minutes` (fixed)**: absolute durations aligned to the policy's `anchor`:
//!   `start = anchor + floor((at - anchor) / len) * len`, also for instants before the anchor.
//!   The time zone, week start and reset hour play no part.
//! * **`day` (fixed)**: local days in the policy's time zone, each starting at local
//!   `reset_hour:00`; a day may last 23 or 25 hours (or 0, see below).
//! * **`week` (fixed)**: starts on `week_start` at local `reset_hour:00`.
//! * **`month` (fixed)**: starts on the anchor's *local* day of month (anchor read in the
//!   policy's zone) at `reset_hour:00`, clamped to the month's last day and always recomputed
//!   from the anchor's day: anchor Jan 31 gives Feb 28 (29 in leap years), Mar 31, Apr 30, …
//!   The anchor's time of day is ignored; `reset_hour` sets the hour.
//! * **Local boundaries** start at the earliest instant whose local wall-clock time reaches
//!   the boundary: inside a DST gap, the first instant after the gap; on a repeated wall time,
//!   its first occurrence; a local day the zone skipped (Pacific/Apia 2011-12-30) is an empty
//!   window that [`WindowSpec::window_at`] never returns, its neighbours being contiguous.
//!   The anchor does not shift `day`/`week` boundaries.
//! * **`total`**: `[anchor, ∞)`. For an instant before the anchor the start is still the
//!   anchor (usage cannot be counted before the policy's window begins).
//! * **Rolling** windows count usage in one-minute buckets: at instant `at` the window is
//!   `[bucket_of(at) + 1 min - len, bucket_of(at) + 1 min)` with absolute lengths:
//!   5h = 5 h, minutes = N min, day = 24 h, week = 7 × 24 h, month = 30 × 24 h.
//!   The anchor, time zone, week start and reset hour play no part. A rolling window has no
//!   reset instant.
//!
//! Fixed windows are half-open `[start, end)` and contiguous: `window_at(w.end).start == w.end`.

mod local;

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeDelta, Timelike, Utc, Weekday};
use chrono_tz::Tz;

use crate::policy::{Period, WindowMode};
use local::{Calendar, LocalWindows};

/// A half-open span of time `[start, end)`; `end == None` means it never ends (`total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
}

impl Window {
    /// Whether `at` lies in `[start, end)`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && self.end.is_none_or(|end| at < end)
    }
}

/// Everything that decides a policy's windows. Build it with [`WindowSpec::from_columns`],
/// which validates; a hand-built spec with out-of-range values is clamped instead
/// (`Minutes(0)` acts as one minute, `reset_hour > 23` as 23, rolling `total` as fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    pub period: Period,
    pub mode: WindowMode,
    /// Alignment point of `5h`/`minutes` windows, start of `total`, day of month of `month`.
    pub anchor: DateTime<Utc>,
    /// Time zone of `day`/`week`/`month` boundaries.
    pub tz: Tz,
    /// First day of a `week` window.
    pub week_start: Weekday,
    /// Local hour (0–23) at which `day`/`week`/`month` windows start.
    pub reset_hour: u32,
}

impl WindowSpec {
    /// The window containing `at` (see the module docs for the rules).
    ///
    /// Always `start <= at < end`, except for `total` before its anchor, where the window is
    /// still `[anchor, ∞)`.
    pub fn window_at(&self, at: DateTime<Utc>) -> Window {
        match (self.period, self.mode) {
            (Period::Total, _) => Window {
                start: self.anchor,
                end: None,
            },
            (_, WindowMode::Rolling) => rolling_window(at, self.absolute_length()),
            (Period::FiveHours | Period::Minutes(_), WindowMode::Fixed) => {
                aligned_window(self.anchor, at, self.absolute_length())
            }
            (Period::Day | Period::Week | Period::Month, WindowMode::Fixed) => {
                self.local_windows().window_at(at)
            }
        }
    }

    /// When the window containing `at` resets: its end for fixed windows; `None` for rolling
    /// windows (they slide instead of resetting) and for `total` (it never resets).
    pub fn next_reset(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.mode {
            WindowMode::Fixed => self.window_at(at).end,
            WindowMode::Rolling => None,
        }
    }

    /// The length of a rolling window (`None` for fixed mode and for `total`).
    pub fn rolling_length(&self) -> Option<Duration> {
        match (self.mode, self.period) {
            (WindowMode::Rolling, Period::Total) | (WindowMode::Fixed, _) => None,
            (WindowMode::Rolling, _) => Some(self.absolute_length()),
        }
    }

    /// Floors `at` to the start of its UTC minute, the granularity of rolling windows.
    pub fn bucket_of(at: DateTime<Utc>) -> DateTime<Utc> {
        at.with_nanosecond(0)
            .and_then(|t| t.with_second(0))
            .unwrap_or(at)
    }

    /// Absolute length of the period as used by rolling windows and fixed `5h`/`minutes`.
    /// `total` has none; it is never asked for (callers match on it first).
    fn absolute_length(&self) -> Duration {
        match self.period {
            Period::FiveHours => Duration::hours(5),
            Period::Minutes(n) => Duration::minutes(i64::from(n.max(1))),
            Period::Day => Duration::hours(24),
            Period::Week => Duration::hours(7 * 24),
            Period::Month | Period::Total => Duration::hours(30 * 24),
        }
    }

    fn local_windows(&self) -> LocalWindows {
        let calendar = match self.period {
            Period::Week => Calendar::Week(self.week_start),
            Period::Month => Calendar::Month {
                day: self.anchor.with_timezone(&self.tz).day(),
            },
            _ => Calendar::Day,
        };
        LocalWindows {
            calendar,
            tz: self.tz,
            reset: NaiveTime::from_hms_opt(self.reset_hour.min(23), 0, 0).unwrap_or(NaiveTime::MIN),
        }
    }
}

/// `[bucket + 1 min - len, bucket + 1 min)`: the current minute counts in full.
fn rolling_window(at: DateTime<Utc>, len: Duration) -> Window {
    let end = saturating_add(WindowSpec::bucket_of(at), Duration::minutes(1));
    Window {
        start: saturating_add(end, -len),
        end: Some(end),
    }
}

/// The `len`-long window of the grid `anchor + k * len` (any integer k) that contains `at`.
fn aligned_window(anchor: DateTime<Utc>, at: DateTime<Utc>, len: Duration) -> Window {
    let len_ns = nanos(len);
    // Floor (not truncating) division so instants before the anchor land in the right cell.
    let cells = nanos(at - anchor).div_euclid(len_ns);
    let start = saturating_add(anchor, from_nanos(cells * len_ns));
    Window {
        start,
        end: Some(saturating_add(start, len)),
    }
}

/// Exact nanoseconds of a duration; i128 because `minutes` lengths can exceed i64 nanoseconds.
fn nanos(d: Duration) -> i128 {
    i128::from(d.num_seconds()) * 1_000_000_000 + i128::from(d.subsec_nanos())
}

/// Inverse of [`nanos`], saturating at chrono's limits.
fn from_nanos(ns: i128) -> Duration {
    let secs = i64::try_from(ns.div_euclid(1_000_000_000));
    let sub = u32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0);
    match secs.ok().and_then(|s| TimeDelta::new(s, sub)) {
        Some(d) => d,
        None if ns < 0 => TimeDelta::MIN,
        None => TimeDelta::MAX,
    }
}

fn saturating_add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(if d < Duration::zero() {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn spec(period: &str, minutes: Option<i32>, mode: &str, anchor: &str, tz: &str) -> WindowSpec {
        WindowSpec::from_columns(period, minutes, mode, utc(anchor), tz, 1, 0).unwrap()
    }

    fn with_reset(mut s: WindowSpec, reset_hour: u32) -> WindowSpec {
        s.reset_hour = reset_hour;
        s
    }

    fn win(start: &str, end: &str) -> Window {
        Window {
            start: utc(start),
            end: Some(utc(end)),
        }
    }

    fn hours(w: Window) -> i64 {
        (w.end.unwrap() - w.start).num_hours()
    }

    const ANCHOR: &str = "2026-01-01T00:00:00Z";

    // ---- DST-length days -------------------------------------------------------------

    #[test]
    fn new_york_spring_forward_day_is_23_hours() {
        let s = spec("day", None, "fixed", ANCHOR, "America/New_York");
        let w = s.window_at(utc("2026-03-08T12:00:00Z"));
        assert_eq!(w, win("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"));
        assert_eq!(hours(w), 23);
    }

    #[test]
    fn new_york_fall_back_day_is_25_hours() {
        let s = spec("day", None, "fixed", ANCHOR, "America/New_York");
        let w = s.window_at(utc("2026-11-01T12:00:00Z"));
        assert_eq!(w, win("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"));
        assert_eq!(hours(w), 25);
    }

    #[test]
    fn berlin_dst_days_are_23_and_25_hours() {
        let s = spec("day", None, "fixed", ANCHOR, "Europe/Berlin");
        let spring = s.window_at(utc("2026-03-29T12:00:00Z"));
        assert_eq!(spring, win("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"));
        assert_eq!(hours(spring), 23);
        let autumn = s.window_at(utc("2026-10-25T12:00:00Z"));
        assert_eq!(autumn, win("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"));
        assert_eq!(hours(autumn), 25);
    }

    // ---- reset hour in a gap / on a repeated hour ---------------------------------------

    #[test]
    fn new_york_reset_hour_inside_the_spring_gap() {
        // 02:00 does not exist on 2026-03-08: the day starts at 03:00 EDT = 07:00Z.
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "America/New_York"), 2);
        let w = s.window_at(utc("2026-03-08T12:00:00Z"));
        assert_eq!(w, win("2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z"));
        assert_eq!(hours(w), 23);
        // 01:59:59 EST is still the previous (24 h) day.
        let before = s.window_at(utc("2026-03-08T06:59:59Z"));
        assert_eq!(before, win("2026-03-07T07:00:00Z", "2026-03-08T07:00:00Z"));
        assert_eq!(
            s.window_at(utc("2026-03-08T07:00:00Z")).start,
            utc("2026-03-08T07:00:00Z")
        );
    }

    #[test]
    fn new_york_reset_hour_on_the_repeated_hour() {
        // 01:00 happens twice on 2026-11-01: the day starts at the first, 01:00 EDT = 05:00Z.
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "America/New_York"), 1);
        let expected = win("2026-11-01T05:00:00Z", "2026-11-02T06:00:00Z");
        assert_eq!(s.window_at(utc("2026-11-01T05:00:00Z")), expected);
        // 01:30 EST (the second 01:30) is inside the same window, not a new one.
        assert_eq!(s.window_at(utc("2026-11-01T06:30:00Z")), expected);
        assert_eq!(hours(expected), 25);
        assert_eq!(
            s.window_at(utc("2026-11-01T04:59:59Z")),
            win("2026-10-31T05:00:00Z", "2026-11-01T05:00:00Z")
        );
    }

    #[test]
    fn berlin_reset_hour_inside_the_spring_gap() {
        // 02:00 does not exist on 2026-03-29: the day starts at 03:00 CEST = 01:00Z.
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "Europe/Berlin"), 2);
        assert_eq!(
            s.window_at(utc("2026-03-29T01:00:00Z")),
            win("2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z")
        );
        assert_eq!(
            s.window_at(utc("2026-03-29T00:59:59Z")),
            win("2026-03-28T01:00:00Z", "2026-03-29T01:00:00Z")
        );
    }

    #[test]
    fn berlin_reset_hour_on_the_repeated_hour() {
        // 02:00 happens twice on 2026-10-25: first as CEST = 00:00Z.
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "Europe/Berlin"), 2);
        let expected = win("2026-10-25T00:00:00Z", "2026-10-26T01:00:00Z");
        assert_eq!(s.window_at(utc("2026-10-25T00:00:00Z")), expected);
        assert_eq!(s.window_at(utc("2026-10-25T01:30:00Z")), expected); // 02:30 CET
        assert_eq!(
            s.window_at(utc("2026-10-24T23:59:59Z")),
            win("2026-10-24T00:00:00Z", "2026-10-25T00:00:00Z")
        );
    }

    #[test]
    fn troll_two_hour_dst_gap_and_repeat() {
        // Antarctica/Troll jumps +00 -> +02 at 01:00Z and back at 01:00Z: two-hour changes.
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "Antarctica/Troll"), 2);
        // 2026-03-29: wall 01:00 -> 03:00, so the 02:00 boundary starts at 01:00Z.
        assert_eq!(
            s.window_at(utc("2026-03-29T01:00:00Z")),
            win("2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z")
        );
        // 2026-10-25: wall 03:00 -> 01:00, so 01:00-03:00 repeats; 02:00 first happens at 00:00Z.
        let expected = win("2026-10-25T00:00:00Z", "2026-10-26T02:00:00Z");
        assert_eq!(s.window_at(utc("2026-10-25T00:00:00Z")), expected);
        // 01:30Z reads 01:30 (before 02:00) on the wall, yet the day has already begun.
        assert_eq!(s.window_at(utc("2026-10-25T01:30:00Z")), expected);
        assert_eq!(hours(expected), 26);
    }

    // ---- Pacific/Apia skipped 2011-12-30 ------------------------------------------------

    #[test]
    fn apia_skipped_day_is_never_returned_and_neighbours_are_contiguous() {
        let s = spec("day", None, "fixed", ANCHOR, "Pacific/Apia");
        let dec29 = s.window_at(utc("2011-12-30T09:59:59Z")); // 23:59:59 on the 29th, -10
        assert_eq!(dec29, win("2011-12-29T10:00:00Z", "2011-12-30T10:00:00Z"));
        let dec31 = s.window_at(dec29.end.unwrap()); // 00:00 on the 31st, +14
        assert_eq!(dec31, win("2011-12-30T10:00:00Z", "2011-12-31T10:00:00Z"));
        assert_eq!(dec31.start, dec29.end.unwrap());
        // Walk instant by instant over the switch: every window returned is non-empty.
        let mut t = utc("2011-12-30T08:00:00Z");
        while t < utc("2011-12-30T12:00:00Z") {
            let w = s.window_at(t);
            assert!(w.contains(t), "{t}: {w:?}");
            assert!(w.start < w.end.unwrap());
            t += Duration::minutes(7);
        }
    }

    // ---- month clamp ----------------------------------------------------------------------

    #[test]
    fn month_anchor_31_clamps_and_returns_to_31() {
        let s = spec("month", None, "fixed", "2026-01-31T00:00:00Z", "UTC");
        let jan = s.window_at(utc("2026-02-15T00:00:00Z"));
        assert_eq!(jan, win("2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z"));
        let feb = s.window_at(jan.end.unwrap());
        assert_eq!(feb, win("2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"));
        let mar = s.window_at(feb.end.unwrap());
        assert_eq!(mar, win("2026-03-31T00:00:00Z", "2026-04-30T00:00:00Z"));
        let apr = s.window_at(mar.end.unwrap());
        assert_eq!(apr, win("2026-04-30T00:00:00Z", "2026-05-31T00:00:00Z"));
        // Mid-March is still February's window: the start does not drift to the 28th.
        assert_eq!(s.window_at(utc("2026-03-30T23:59:59Z")), feb);
    }

    #[test]
    fn month_anchor_31_in_a_leap_year() {
        let s = spec("month", None, "fixed", "2026-01-31T00:00:00Z", "UTC");
        assert_eq!(
            s.window_at(utc("2028-02-10T00:00:00Z")),
            win("2028-01-31T00:00:00Z", "2028-02-29T00:00:00Z")
        );
        assert_eq!(
            s.window_at(utc("2028-03-01T00:00:00Z")),
            win("2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z")
        );
    }

    #[test]
    fn month_day_is_the_anchor_local_day_at_reset_hour() {
        // 2026-01-31T03:00Z is Jan 30, 22:00 in New York: the day of month is 30.
        let s = with_reset(
            spec(
                "month",
                None,
                "fixed",
                "2026-01-31T03:00:00Z",
                "America/New_York",
            ),
            9,
        );
        assert_eq!(
            s.window_at(utc("2026-03-15T12:00:00Z")),
            // Feb 28 09:00 EST .. Mar 30 09:00 EDT
            win("2026-02-28T14:00:00Z", "2026-03-30T13:00:00Z")
        );
    }

    // ---- custom minutes, 5h, rolling ----------------------------------------------------

    #[test]
    fn ninety_minute_windows_align_to_an_odd_anchor() {
        let s = spec(
            "minutes",
            Some(90),
            "fixed",
            "2026-01-01T00:07:13Z",
            "Asia/Tokyo",
        );
        assert_eq!(
            s.window_at(utc("2026-01-01T03:00:00Z")),
            win("2026-01-01T01:37:13Z", "2026-01-01T03:07:13Z")
        );
        assert_eq!(
            s.window_at(utc("2026-01-01T03:07:13Z")),
            win("2026-01-01T03:07:13Z", "2026-01-01T04:37:13Z")
        );
        // Before the anchor: floor division, not truncation toward the anchor.
        assert_eq!(
            s.window_at(utc("2025-12-31T23:00:00Z")),
            win("2025-12-31T22:37:13Z", "2026-01-01T00:07:13Z")
        );
    }

    #[test]
    fn five_hours_fixed_and_rolling_differ() {
        let fixed = spec("5h", None, "fixed", ANCHOR, "UTC");
        let rolling = spec("5h", None, "rolling", ANCHOR, "UTC");
        let at = utc("2026-01-01T06:30:45.250Z");
        assert_eq!(
            fixed.window_at(at),
            win("2026-01-01T05:00:00Z", "2026-01-01T10:00:00Z")
        );
        assert_eq!(
            rolling.window_at(at),
            win("2026-01-01T01:31:00Z", "2026-01-01T06:31:00Z")
        );
        let later = utc("2026-01-01T10:00:10Z");
        assert_eq!(
            fixed.window_at(later),
            win("2026-01-01T10:00:00Z", "2026-01-01T15:00:00Z")
        );
        assert_eq!(
            rolling.window_at(later),
            win("2026-01-01T05:01:00Z", "2026-01-01T10:01:00Z")
        );
    }

    #[test]
    fn rolling_lengths_are_absolute() {
        let at = utc("2026-03-08T12:34:56Z"); // a 23 h local day in New York
        for (period, minutes, len) in [
            ("5h", None, Duration::hours(5)),
            ("minutes", Some(90), Duration::minutes(90)),
            ("day", None, Duration::hours(24)),
            ("week", None, Duration::hours(168)),
            ("month", None, Duration::hours(720)),
        ] {
            let s = spec(period, minutes, "rolling", ANCHOR, "America/New_York");
            assert_eq!(s.rolling_length(), Some(len), "{period}");
            let w = s.window_at(at);
            assert_eq!(w.end, Some(utc("2026-03-08T12:35:00Z")), "{period}");
            assert_eq!(w.end.unwrap() - w.start, len, "{period}");
            let f = spec(period, minutes, "fixed", ANCHOR, "America/New_York");
            assert_eq!(f.rolling_length(), None, "{period}");
        }
        assert_eq!(
            spec("total", None, "fixed", ANCHOR, "UTC").rolling_length(),
            None
        );
    }

    #[test]
    fn bucket_of_floors_to_the_minute() {
        assert_eq!(
            WindowSpec::bucket_of(utc("2026-01-01T06:30:45.999999Z")),
            utc("2026-01-01T06:30:00Z")
        );
        assert_eq!(
            WindowSpec::bucket_of(utc("2026-01-01T06:30:00Z")),
            utc("2026-01-01T06:30:00Z")
        );
        assert_eq!(
            WindowSpec::bucket_of(utc("1969-12-31T23:59:30.5Z")),
            utc("1969-12-31T23:59:00Z")
        );
    }

    // ---- weeks, Tokyo, total ------------------------------------------------------------

    #[test]
    fn week_start_monday_vs_sunday() {
        let monday = spec("week", None, "fixed", ANCHOR, "UTC");
        let mut sunday = monday;
        sunday.week_start = Weekday::Sun;
        let wednesday = utc("2026-03-11T12:00:00Z");
        assert_eq!(
            monday.window_at(wednesday),
            win("2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z")
        );
        assert_eq!(
            sunday.window_at(wednesday),
            win("2026-03-08T00:00:00Z", "2026-03-15T00:00:00Z")
        );
        let sunday_noon = utc("2026-03-15T12:00:00Z");
        assert_eq!(
            monday.window_at(sunday_noon),
            win("2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z")
        );
        assert_eq!(
            sunday.window_at(sunday_noon),
            win("2026-03-15T00:00:00Z", "2026-03-22T00:00:00Z")
        );
    }

    #[test]
    fn week_across_new_york_dst_is_167_hours() {
        let s =
            WindowSpec::from_columns("week", None, "fixed", utc(ANCHOR), "America/New_York", 7, 0)
                .unwrap();
        let w = s.window_at(utc("2026-03-10T12:00:00Z"));
        assert_eq!(w, win("2026-03-08T05:00:00Z", "2026-03-15T04:00:00Z"));
        assert_eq!(hours(w), 167);
    }

    #[test]
    fn tokyo_reset_hour_6_starts_at_21z_the_day_before() {
        let s = with_reset(spec("day", None, "fixed", ANCHOR, "Asia/Tokyo"), 6);
        assert_eq!(
            s.window_at(utc("2026-05-10T00:00:00Z")), // 09:00 JST
            win("2026-05-09T21:00:00Z", "2026-05-10T21:00:00Z")
        );
        assert_eq!(
            s.window_at(utc("2026-05-09T20:59:59Z")), // 05:59:59 JST
            win("2026-05-08T21:00:00Z", "2026-05-09T21:00:00Z")
        );
    }

    #[test]
    fn total_starts_at_the_anchor_and_never_ends() {
        let s = spec("total", None, "fixed", "2026-02-01T10:00:00Z", "UTC");
        let expected = Window {
            start: utc("2026-02-01T10:00:00Z"),
            end: None,
        };
        assert_eq!(s.window_at(utc("2030-01-01T00:00:00Z")), expected);
        assert_eq!(s.window_at(utc("2020-01-01T00:00:00Z")), expected); // before the anchor
        assert!(!expected.contains(utc("2020-01-01T00:00:00Z")));
        assert!(expected.contains(utc("2099-01-01T00:00:00Z")));
    }

    #[test]
    fn next_reset_values() {
        let at = utc("2026-10-25T12:00:00Z");
        let day = spec("day", None, "fixed", ANCHOR, "Europe/Berlin");
        assert_eq!(day.next_reset(at), Some(utc("2026-10-25T23:00:00Z")));
        let five = spec("5h", None, "fixed", ANCHOR, "Europe/Berlin");
        // 297 days = 7128 h after the anchor; the 5 h grid has a boundary at 7125 h = 12:00Z.
        assert_eq!(five.next_reset(at), Some(utc("2026-10-25T17:00:00Z")));
        let month = spec("month", None, "fixed", "2026-01-31T00:00:00Z", "UTC");
        assert_eq!(
            month.next_reset(utc("2026-02-27T23:59:59Z")),
            Some(utc("2026-02-28T00:00:00Z"))
        );
        assert_eq!(
            spec("day", None, "rolling", ANCHOR, "UTC").next_reset(at),
            None
        );
        assert_eq!(
            spec("total", None, "fixed", ANCHOR, "UTC").next_reset(at),
            None
        );
    }

    #[test]
    fn hand_built_out_of_range_values_are_clamped() {
        let mut s = spec("minutes", Some(1), "fixed", ANCHOR, "UTC");
        s.period = Period::Minutes(0);
        assert_eq!(
            s.window_at(utc("2026-01-01T00:00:30Z")),
            win("2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z")
        );
        let mut t = spec("total", None, "fixed", ANCHOR, "UTC");
        t.mode = WindowMode::Rolling;
        assert_eq!(t.window_at(utc("2027-01-01T00:00:00Z")).end, None);
        assert_eq!(t.rolling_length(), None);
    }

    #[test]
    fn longest_custom_window_does_not_overflow() {
        let s = spec("minutes", Some(i32::MAX), "fixed", ANCHOR, "UTC");
        let w = s.window_at(utc("2026-06-01T00:00:00Z"));
        assert_eq!(w.start, utc(ANCHOR));
        assert_eq!(
            w.end.unwrap() - w.start,
            Duration::minutes(i64::from(i32::MAX))
        );
    }
}
