//! Property tests of window math over random zones, periods, modes, anchors and instants.

use chrono::{
    DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc, Weekday,
};
use chrono_tz::Tz;
use pg_quota_core::{Period, WindowMode, WindowSpec};
use proptest::prelude::*;

const ZONES: &[Tz] = &[
    chrono_tz::America::New_York,
    chrono_tz::Europe::Berlin,
    chrono_tz::Australia::Lord_Howe,
    chrono_tz::Pacific::Apia,
    chrono_tz::Asia::Kathmandu,
    chrono_tz::Asia::Tokyo,
    chrono_tz::America::Santiago, // DST changes at local midnight
    chrono_tz::Antarctica::Troll, // two-hour DST: a whole reset hour repeats
    chrono_tz::UTC,
];

const WEEKDAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

// 1990-01-01T00:00:00Z .. 2040-01-01T00:00:00Z
const FROM: i64 = 631_152_000;
const TO: i64 = 2_208_988_800;

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (FROM..TO, 0u32..1_000_000).prop_map(|(s, us)| DateTime::from_timestamp(s, us * 1000).unwrap())
}

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![
        Just(Period::FiveHours),
        Just(Period::Day),
        Just(Period::Week),
        Just(Period::Month),
        Just(Period::Total),
        (1u32..=200_000).prop_map(Period::Minutes),
    ]
}

fn local_period() -> impl Strategy<Value = Period> {
    prop_oneof![Just(Period::Day), Just(Period::Week), Just(Period::Month)]
}

fn spec_with(period: impl Strategy<Value = Period>) -> impl Strategy<Value = WindowSpec> {
    (
        period,
        prop_oneof![Just(WindowMode::Fixed), Just(WindowMode::Rolling)],
        instant(),
        prop::sample::select(ZONES),
        prop::sample::select(&WEEKDAYS[..]),
        0u32..24,
    )
        .prop_map(
            |(period, mode, anchor, tz, week_start, reset_hour)| WindowSpec {
                period,
                // rolling total is refused by validation
                mode: if period == Period::Total {
                    WindowMode::Fixed
                } else {
                    mode
                },
                anchor,
                tz,
                week_start,
                reset_hour,
            },
        )
}

fn fixed(mut s: WindowSpec) -> WindowSpec {
    s.mode = WindowMode::Fixed;
    s
}

fn wall(tz: Tz, t: DateTime<Utc>) -> NaiveDateTime {
    t.with_timezone(&tz).naive_local()
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let first = NaiveDate::from_ymd_opt(year, month, 1).unwrap();
    let next = first + chrono::Months::new(1);
    (next - first).num_days() as u32
}

/// Independent oracle: whether `date` carries a boundary for this spec.
fn is_boundary_date(s: &WindowSpec, date: NaiveDate) -> bool {
    match s.period {
        Period::Day => true,
        Period::Week => date.weekday() == s.week_start,
        Period::Month => {
            let anchor_day = s.anchor.with_timezone(&s.tz).day();
            date.day() == anchor_day.min(days_in_month(date.year(), date.month()))
        }
        _ => unreachable!("not a local-calendar period"),
    }
}

/// The latest boundary wall-clock time that is <= `local`, found by scanning dates backwards.
fn boundary_at_or_before(s: &WindowSpec, local: NaiveDateTime) -> NaiveDateTime {
    let reset = NaiveTime::from_hms_opt(s.reset_hour, 0, 0).unwrap();
    let mut date = local.date();
    loop {
        let b = date.and_time(reset);
        if is_boundary_date(s, date) && b <= local {
            return b;
        }
        date = date.pred_opt().unwrap();
    }
}

/// True when the zone's offset changes exactly at `t` (a gap or repeat starts there).
fn offset_changes_at(tz: Tz, t: DateTime<Utc>) -> bool {
    wall(tz, t) - wall(tz, t - Duration::seconds(1)) != Duration::seconds(1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn window_contains_the_instant(s in spec_with(period()), at in instant()) {
        let w = s.window_at(at);
        match s.period {
            Period::Total => {
                prop_assert_eq!(w.start, s.anchor);
                prop_assert_eq!(w.end, None);
            }
            _ => {
                let end = w.end.expect("only total is open-ended");
                prop_assert!(w.start <= at && at < end, "{:?} at {} -> {:?}", s, at, w);
            }
        }
    }

    #[test]
    fn fixed_window_is_stable_at_its_start(s in spec_with(period()), at in instant()) {
        let s = fixed(s);
        let w = s.window_at(at);
        prop_assert_eq!(s.window_at(w.start), w);
        prop_assert_eq!(s.next_reset(at), w.end);
    }

    #[test]
    fn fixed_windows_are_contiguous(s in spec_with(period()), at in instant()) {
        let s = fixed(s);
        let w = s.window_at(at);
        if let Some(end) = w.end {
            prop_assert_eq!(s.window_at(end).start, end, "{:?} at {} -> {:?}", s, at, w);
            // and the last instant of the window still belongs to it
            prop_assert_eq!(s.window_at(end - Duration::nanoseconds(1)), w);
        }
    }

    #[test]
    fn local_window_start_is_the_earliest_instant_reaching_its_boundary(
        s in spec_with(local_period()),
        at in instant(),
    ) {
        let s = fixed(s);
        let w = s.window_at(at);
        let start_wall = wall(s.tz, w.start);
        let boundary = boundary_at_or_before(&s, start_wall);
        let before = wall(s.tz, w.start - Duration::seconds(1));
        prop_assert!(before < boundary, "{:?}: {} before {} boundary {}", s, before, w.start, boundary);
        prop_assert!(start_wall >= boundary);
        if !offset_changes_at(s.tz, w.start) {
            // no gap at the start: the start is exactly the boundary's wall time
            prop_assert_eq!(start_wall, boundary);
        }
    }

    #[test]
    fn local_window_starts_on_the_right_date_and_hour(s in spec_with(local_period()), at in instant()) {
        let s = fixed(s);
        let w = s.window_at(at);
        let start_wall = wall(s.tz, w.start);
        if !offset_changes_at(s.tz, w.start) {
            prop_assert_eq!(start_wall.time(), NaiveTime::from_hms_opt(s.reset_hour, 0, 0).unwrap());
            prop_assert!(is_boundary_date(&s, start_wall.date()), "{:?} start {}", s, start_wall);
        }
    }

    #[test]
    fn month_starts_on_the_clamped_anchor_day(s in spec_with(Just(Period::Month)), at in instant()) {
        let s = fixed(s);
        let anchor_day = s.anchor.with_timezone(&s.tz).day();
        let w = s.window_at(at);
        let start_wall = wall(s.tz, w.start);
        if !offset_changes_at(s.tz, w.start) {
            let d = start_wall.date();
            prop_assert_eq!(d.day(), anchor_day.min(days_in_month(d.year(), d.month())));
        }
        // One calendar month, give or take a DST change of up to 2 h (Troll) or a skipped day.
        let len = w.end.unwrap() - w.start;
        prop_assert!(len >= Duration::hours(28 * 24 - 2) && len <= Duration::hours(31 * 24 + 2), "{:?}", len);
    }

    #[test]
    fn fixed_absolute_windows_have_exactly_the_period_length(
        s in spec_with(prop_oneof![Just(Period::FiveHours), (1u32..=200_000).prop_map(Period::Minutes)]),
        at in instant(),
    ) {
        let s = fixed(s);
        let w = s.window_at(at);
        let len = match s.period {
            Period::FiveHours => Duration::hours(5),
            Period::Minutes(n) => Duration::minutes(i64::from(n)),
            _ => unreachable!(),
        };
        prop_assert_eq!(w.end.unwrap() - w.start, len);
        // aligned to the anchor: a whole number of lengths away from it
        let offset_ns = (w.start - s.anchor).num_nanoseconds().unwrap();
        prop_assert_eq!(offset_ns % len.num_nanoseconds().unwrap(), 0);
    }

    #[test]
    fn rolling_windows_end_at_the_next_minute(
        s in spec_with(prop_oneof![
            Just(Period::FiveHours), Just(Period::Day), Just(Period::Week), Just(Period::Month),
            (1u32..=200_000).prop_map(Period::Minutes),
        ]),
        at in instant(),
    ) {
        let mut s = s;
        s.mode = WindowMode::Rolling;
        let w = s.window_at(at);
        let end = w.end.unwrap();
        prop_assert_eq!(end, WindowSpec::bucket_of(at) + Duration::minutes(1));
        prop_assert!(end - Duration::minutes(1) <= at && at < end);
        prop_assert_eq!(Some(end - w.start), s.rolling_length());
        prop_assert_eq!(w.start.timestamp() % 60, 0);
        prop_assert_eq!(w.start.timestamp_subsec_nanos(), 0);
        prop_assert_eq!(s.next_reset(at), None);
    }
}

/// Every offset change of `tz` between 1990 and 2040, to the second (computed once).
fn transitions(tz: Tz) -> &'static [DateTime<Utc>] {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    type Table = HashMap<Tz, Vec<DateTime<Utc>>>;
    static TABLE: OnceLock<Table> = OnceLock::new();
    let table = TABLE.get_or_init(|| ZONES.iter().map(|&z| (z, scan_transitions(z))).collect());
    &table[&tz]
}

fn scan_transitions(tz: Tz) -> Vec<DateTime<Utc>> {
    let offset = |secs: i64| {
        let t = DateTime::from_timestamp(secs, 0).unwrap();
        wall(tz, t) - t.naive_utc()
    };
    let step = 6 * 3600; // no zone changes offset twice within 6 hours
    let mut found = Vec::new();
    let mut s = FROM;
    while s < TO {
        if offset(s) != offset(s + step) {
            let (mut lo, mut hi) = (s, s + step);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset(mid) == offset(lo) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            found.push(DateTime::from_timestamp(hi, 0).unwrap());
        }
        s += step;
    }
    found
}

/// A local-calendar spec and an instant close to one of its zone's offset changes, with the
/// reset hour often placed in the skipped or repeated hour.
fn near_transition() -> impl Strategy<Value = (WindowSpec, DateTime<Utc>)> {
    let zones: Vec<Tz> = ZONES
        .iter()
        .copied()
        .filter(|tz| !transitions(*tz).is_empty())
        .collect();
    (
        spec_with(local_period()),
        prop::sample::select(zones),
        any::<prop::sample::Index>(),
        // mostly right next to the change, where gaps and repeats bite
        prop_oneof![-2 * 3600i64..2 * 3600, -40 * 3600i64..40 * 3600],
        0usize..4,
    )
        .prop_map(|(mut s, tz, which, delta, hour_pick)| {
            let t = *which.get(transitions(tz));
            s.tz = tz;
            s.mode = WindowMode::Fixed;
            let before = wall(tz, t - Duration::seconds(1)).time();
            let hours = [
                before.hour(),             // hour before a gap / repeated hour
                (before.hour() + 1) % 24,  // hour inside a gap
                wall(tz, t).time().hour(), // hour after the change
                s.reset_hour,
            ];
            s.reset_hour = hours[hour_pick];
            (s, t + Duration::seconds(delta))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn windows_near_offset_changes_obey_the_boundary_rule((s, at) in near_transition()) {
        let w = s.window_at(at);
        let end = w.end.unwrap();
        prop_assert!(w.start <= at && at < end, "{:?} at {} -> {:?}", s, at, w);
        prop_assert_eq!(s.window_at(w.start), w);
        prop_assert_eq!(s.window_at(end).start, end);
        let start_wall = wall(s.tz, w.start);
        let boundary = boundary_at_or_before(&s, start_wall);
        prop_assert!(wall(s.tz, w.start - Duration::seconds(1)) < boundary, "{:?} {:?}", s, w);
        if !offset_changes_at(s.tz, w.start) {
            prop_assert_eq!(start_wall, boundary);
        }
    }
}

#[test]
fn transition_scan_finds_known_changes() {
    let ny = transitions(chrono_tz::America::New_York);
    let spring = DateTime::parse_from_rfc3339("2026-03-08T07:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let autumn = DateTime::parse_from_rfc3339("2026-11-01T06:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert!(ny.contains(&spring) && ny.contains(&autumn));
    assert!(transitions(chrono_tz::UTC).is_empty());
}
