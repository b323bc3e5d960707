//! Local-calendar windows (`day`, `week`, `month`) in an IANA time zone.
//!
//! Each window starts at a *boundary*: a local wall-clock date-time (a boundary date at
//! `reset_hour:00`). The instant of a boundary is the EARLIEST instant whose local wall-clock
//! time reaches (>=) it, which gives the DESIGN.md rule:
//!
//! * a boundary inside a DST gap starts at the first instant after the gap;
//! * a repeated wall time counts from its first occurrence;
//! * a local day a zone skipped entirely (Pacific/Apia, 2011-12-30) gets an empty window.
//!
//! "Earliest instant reaching L" never decreases as L grows, so consecutive boundaries give
//! contiguous half-open windows that cover the whole time line, some of them possibly empty.

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;

use super::Window;

/// Which dates carry a boundary. Boundary number `k` (any i64) is the k-th such date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Calendar {
    /// Every date; `k` is the day number from the common era.
    Day,
    /// Every date falling on this weekday; `k` counts weeks.
    Week(Weekday),
    /// One date per month, the given day clamped to the month's length; `k` = year * 12 + month0.
    Month { day: u32 },
}

impl Calendar {
    /// Date of boundary `k`; `None` only outside chrono's date range.
    fn date(self, k: i64) -> Option<NaiveDate> {
        match self {
            Calendar::Day => from_ce_days(k),
            Calendar::Week(ws) => from_ce_days(k.checked_mul(7)? + week_offset(ws)),
            Calendar::Month { day } => {
                let year = i32::try_from(k.div_euclid(12)).ok()?;
                let month = u32::try_from(k.rem_euclid(12)).ok()? + 1;
                let day = day.min(days_in_month(year, month)?);
                NaiveDate::from_ymd_opt(year, month, day)
            }
        }
    }

    /// Index of the last boundary date that is <= `date` (in calendar order).
    fn index_on_or_before(self, date: NaiveDate) -> i64 {
        let ce = i64::from(date.num_days_from_ce());
        match self {
            Calendar::Day => ce,
            Calendar::Week(ws) => (ce - week_offset(ws)).div_euclid(7),
            Calendar::Month { .. } => {
                let k = i64::from(date.year()) * 12 + i64::from(date.month0());
                match self.date(k) {
                    Some(d) if d > date => k - 1,
                    _ => k,
                }
            }
        }
    }
}

/// Common-era day numbers of dates falling on `ws` are `7k + week_offset(ws)`
/// (day 1, 0001-01-01, is a Monday).
fn week_offset(ws: Weekday) -> i64 {
    1 + i64::from(ws.num_days_from_monday())
}

fn from_ce_days(days: i64) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(i32::try_from(days).ok()?)
}

/// Number of days in `month` (1..=12) of `year`.
fn days_in_month(year: i32, month: u32) -> Option<u32> {
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = first.checked_add_months(chrono::Months::new(1))?;
    u32::try_from((next - first).num_days()).ok()
}

/// The local-calendar windows of one policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalWindows {
    pub(crate) calendar: Calendar,
    pub(crate) tz: Tz,
    pub(crate) reset: NaiveTime,
}

/// Steps the index guess may move; a guess is off by at most a couple of boundaries (offsets
/// differ by < 2 days), so this only stops runaway loops at the edges of chrono's range.
const MAX_REFINE_STEPS: u32 = 64;

impl LocalWindows {
    /// Local wall-clock date-time of boundary `k`.
    fn boundary_local(&self, k: i64) -> Option<NaiveDateTime> {
        Some(self.calendar.date(k)?.and_time(self.reset))
    }

    /// Instant at which window `k` starts (window `k` is `[instant(k), instant(k + 1))`).
    pub(crate) fn boundary_instant(&self, k: i64) -> DateTime<Utc> {
        match self.boundary_local(k) {
            Some(local) => earliest_reaching(self.tz, local),
            None if k < 0 => DateTime::<Utc>::MIN_UTC,
            None => DateTime::<Utc>::MAX_UTC,
        }
    }

    /// The non-empty window containing `at`.
    pub(crate) fn window_at(&self, at: DateTime<Utc>) -> Window {
        let mut k = self.guess_index(at);
        // The guess uses wall-clock time; fix it up against real instants (gaps, repeats).
        let mut steps = 0;
        while self.boundary_instant(k) > at && steps < MAX_REFINE_STEPS {
            k -= 1;
            steps += 1;
        }
        while self.boundary_instant(k + 1) <= at && steps < MAX_REFINE_STEPS {
            k += 1;
            steps += 1;
        }
        Window {
            start: self.boundary_instant(k),
            end: Some(self.boundary_instant(k + 1)),
        }
    }

    /// Index of the last boundary whose wall-clock time is <= the wall-clock time of `at`.
    fn guess_index(&self, at: DateTime<Utc>) -> i64 {
        let local = at.with_timezone(&self.tz).naive_local();
        let k = self.calendar.index_on_or_before(local.date());
        match self.boundary_local(k) {
            Some(b) if b > local => k - 1, // same date but before reset_hour
            _ => k,
        }
    }
}

/// Offsets in the tz database stay well within ±26 h, so the instant at which a local time is
/// first reached lies within this many seconds of that local time read as UTC.
const OFFSET_BRACKET_SECS: i64 = 27 * 3600;

/// The earliest instant whose wall-clock time in `tz` is >= `local`.
pub(crate) fn earliest_reaching(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => first_instant_after_gap(tz, local),
    }
}

/// `local` falls in a gap (DST start, or a skipped day): find the first instant whose wall
/// clock is past it by bisection over whole seconds, whatever the size of the gap.
/// Transitions happen on whole seconds, so the answer is exact.
fn first_instant_after_gap(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let as_utc = local.and_utc().timestamp();
    // Invariant: the wall clock at `lo` is before `local`, at `hi` it has reached it.
    let mut lo = as_utc - OFFSET_BRACKET_SECS;
    let mut hi = as_utc + OFFSET_BRACKET_SECS;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if wall_clock(tz, mid).is_some_and(|w| w >= local) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Wall-clock time in `tz` at Unix second `secs`.
fn wall_clock(tz: Tz, secs: i64) -> Option<NaiveDateTime> {
    Some(
        DateTime::from_timestamp(secs, 0)?
            .with_timezone(&tz)
            .naive_local(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America::New_York, Australia::Lord_Howe, Europe::Berlin, Pacific::Apia};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn local(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn day_windows(tz: Tz, reset_hour: u32) -> LocalWindows {
        LocalWindows {
            calendar: Calendar::Day,
            tz,
            reset: NaiveTime::from_hms_opt(reset_hour, 0, 0).unwrap(),
        }
    }

    fn boundary_on(w: &LocalWindows, date: &str) -> DateTime<Utc> {
        let d = NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap();
        let k = w.calendar.index_on_or_before(d);
        assert_eq!(w.calendar.date(k), Some(d), "{date} is not a boundary date");
        w.boundary_instant(k)
    }

    #[test]
    fn earliest_reaching_plain_gap_and_repeat() {
        assert_eq!(
            earliest_reaching(New_York, local("2026-07-01 12:00:00")),
            utc("2026-07-01T16:00:00Z")
        );
        // 02:30 does not exist on 2026-03-08 in New York: first instant after is 03:00 EDT.
        assert_eq!(
            earliest_reaching(New_York, local("2026-03-08 02:30:00")),
            utc("2026-03-08T07:00:00Z")
        );
        // 01:30 happens twice on 2026-11-01: the first (EDT) occurrence counts.
        assert_eq!(
            earliest_reaching(New_York, local("2026-11-01 01:30:00")),
            utc("2026-11-01T05:30:00Z")
        );
    }

    #[test]
    fn half_hour_gap_in_lord_howe() {
        // Lord Howe springs forward 02:00 +10:30 -> 02:30 +11 on 2026-10-04 (15:30Z on the 3rd).
        assert_eq!(
            earliest_reaching(Lord_Howe, local("2026-10-04 02:00:00")),
            utc("2026-10-03T15:30:00Z")
        );
        assert_eq!(
            earliest_reaching(Lord_Howe, local("2026-10-04 02:15:00")),
            utc("2026-10-03T15:30:00Z")
        );
    }

    #[test]
    fn apia_skipped_day_is_an_empty_window() {
        let w = day_windows(Apia, 0);
        let dec29 = boundary_on(&w, "2011-12-29");
        let dec30 = boundary_on(&w, "2011-12-30");
        let dec31 = boundary_on(&w, "2011-12-31");
        assert_eq!(dec29, utc("2011-12-29T10:00:00Z")); // 00:00 at -10
        assert_eq!(dec30, utc("2011-12-30T10:00:00Z")); // first instant after the skip
        assert_eq!(dec31, dec30, "the skipped 30th must be an empty window");
        assert_eq!(boundary_on(&w, "2012-01-01"), utc("2011-12-31T10:00:00Z")); // at +14
    }

    #[test]
    fn apia_skipped_day_with_a_later_reset_hour_is_not_empty() {
        // With reset 05:00 the window labelled the 30th holds local 31st 00:00-05:00:
        // those wall times are >= 30th 05:00 and < 31st 05:00.
        let w = day_windows(Apia, 5);
        assert_eq!(boundary_on(&w, "2011-12-30"), utc("2011-12-30T10:00:00Z"));
        assert_eq!(boundary_on(&w, "2011-12-31"), utc("2011-12-30T15:00:00Z"));
    }

    #[test]
    fn month_calendar_clamps_without_drift() {
        let cal = Calendar::Month { day: 31 };
        let dates: Vec<_> = (0..5)
            .map(|m| cal.date(2026 * 12 + m).unwrap().to_string())
            .collect();
        assert_eq!(
            dates,
            [
                "2026-01-31",
                "2026-02-28",
                "2026-03-31",
                "2026-04-30",
                "2026-05-31"
            ]
        );
        assert_eq!(cal.date(2028 * 12 + 1).unwrap().to_string(), "2028-02-29");
        let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        assert_eq!(cal.index_on_or_before(d("2026-03-30")), 2026 * 12 + 1);
        assert_eq!(cal.index_on_or_before(d("2026-03-31")), 2026 * 12 + 2);
    }

    #[test]
    fn week_calendar_lands_on_the_weekday() {
        for ws in [Weekday::Mon, Weekday::Wed, Weekday::Sun] {
            let cal = Calendar::Week(ws);
            for k in [-100_000, -1, 0, 1, 105_000] {
                assert_eq!(cal.date(k).unwrap().weekday(), ws);
                assert_eq!(cal.index_on_or_before(cal.date(k).unwrap()), k);
            }
        }
    }

    #[test]
    fn days_in_month_table() {
        assert_eq!(days_in_month(2026, 2), Some(28));
        assert_eq!(days_in_month(2028, 2), Some(29));
        assert_eq!(days_in_month(2100, 2), Some(28));
        assert_eq!(days_in_month(2000, 2), Some(29));
        assert_eq!(days_in_month(2026, 4), Some(30));
        assert_eq!(days_in_month(2026, 12), Some(31));
    }

    #[test]
    fn berlin_gap_start_is_first_instant_after_the_gap() {
        // 2026-03-29 02:00 CET does not exist; 03:00 CEST = 01:00Z.
        assert_eq!(
            boundary_on(&day_windows(Berlin, 2), "2026-03-29"),
            utc("2026-03-29T01:00:00Z")
        );
    }
}
