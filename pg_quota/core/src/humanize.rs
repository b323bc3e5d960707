//! Approximate durations in words, for client-facing messages ("try again in about 3 hours").
//! Deliberately vague: the relay must not leak exact quota amounts or timings.

const MINUTE: i64 = 60;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Describes `seconds` approximately:
///
/// | seconds              | wording                                   |
/// | -------------------- | ----------------------------------------- |
/// | < 60 (or negative)   | `less than a minute`                      |
/// | < 90 minutes         | `about N minute(s)`, N rounded to nearest |
/// | < 36 hours           | `about N hour(s)`, N rounded to nearest   |
/// | otherwise            | `about N day(s)`, N rounded to nearest    |
///
/// Halves round up (90 s is "about 2 minutes").
pub fn approx_duration(seconds: i64) -> String {
    if seconds < MINUTE {
        "less than a minute".to_owned()
    } else if seconds < 90 * MINUTE {
        about(seconds, MINUTE, "minute")
    } else if seconds < 36 * HOUR {
        about(seconds, HOUR, "hour")
    } else {
        about(seconds, DAY, "day")
    }
}

/// "about N unit(s)" with N = seconds / unit_secs rounded half up (no overflow near i64::MAX).
fn about(seconds: i64, unit_secs: i64, unit: &str) -> String {
    let rounds_up = seconds % unit_secs >= unit_secs - unit_secs / 2;
    let n = seconds / unit_secs + i64::from(rounds_up);
    let plural = if n == 1 { "" } else { "s" };
    format!("about {n} {unit}{plural}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wording_table() {
        let table: &[(i64, &str)] = &[
            (i64::MIN, "less than a minute"),
            (-5, "less than a minute"),
            (0, "less than a minute"),
            (59, "less than a minute"),
            (60, "about 1 minute"),
            (89, "about 1 minute"),
            (90, "about 2 minutes"),
            (45 * 60, "about 45 minutes"),
            (45 * 60 + 29, "about 45 minutes"),
            (45 * 60 + 30, "about 46 minutes"),
            (90 * 60 - 1, "about 90 minutes"),
            (90 * 60, "about 2 hours"),
            (3 * HOUR, "about 3 hours"),
            (3 * HOUR + 29 * MINUTE, "about 3 hours"),
            (3 * HOUR + 30 * MINUTE, "about 4 hours"),
            (36 * HOUR - 1, "about 36 hours"),
            (36 * HOUR, "about 2 days"),
            (2 * DAY, "about 2 days"),
            (2 * DAY + 11 * HOUR, "about 2 days"),
            (2 * DAY + 12 * HOUR, "about 3 days"),
            (30 * DAY, "about 30 days"),
            (i64::MAX, "about 106751991167301 days"),
        ];
        for (secs, want) in table {
            assert_eq!(approx_duration(*secs), *want, "{secs} s");
        }
    }

    #[test]
    fn singular_units() {
        assert_eq!(about(HOUR, HOUR, "hour"), "about 1 hour");
        assert_eq!(about(DAY, DAY, "day"), "about 1 day");
        assert_eq!(about(2 * HOUR, HOUR, "hour"), "about 2 hours");
    }
}
