//! Rate-limit headers: the tightest window admit reported, as OpenAI names and writes them.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::db::RateLimit;

/// `x-ratelimit-{limit,remaining,reset}-<metric>` for the tightest window.
pub fn ratelimit_headers(rl: &RateLimit, headers: &mut HeaderMap) {
    let Some(metric) = rl.metric.as_deref() else {
        return;
    };
    let metric = metric.to_ascii_lowercase();
    if metric.is_empty()
        || !metric
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return;
    }
    let mut put = |what: &str, value: String| {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("x-ratelimit-{what}-{metric}").as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    };
    if let Some(limit) = &rl.limit {
        put("limit", limit.clone());
    }
    if let Some(remaining) = &rl.remaining {
        put("remaining", remaining.clone());
    }
    if let Some(reset) = rl.reset_s {
        put("reset", reset_duration(reset.max(0)));
    }
}

/// A time until reset as OpenAI writes it in `x-ratelimit-reset-*` (Go's duration format:
/// `45s`, `6m0s`, `1h30m0s`), so clients written for OpenAI's headers read ours.
fn reset_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_headers_name_the_metric() {
        let mut h = HeaderMap::new();
        ratelimit_headers(
            &RateLimit {
                metric: Some("cost".into()),
                limit: Some("10.00".into()),
                remaining: Some("7.25".into()),
                reset_s: Some(3600),
            },
            &mut h,
        );
        assert_eq!(h["x-ratelimit-limit-cost"], "10.00");
        assert_eq!(h["x-ratelimit-remaining-cost"], "7.25");
        assert_eq!(h["x-ratelimit-reset-cost"], "1h0m0s");
        let mut h = HeaderMap::new();
        ratelimit_headers(
            &RateLimit {
                metric: None,
                limit: Some("1".into()),
                ..Default::default()
            },
            &mut h,
        );
        ratelimit_headers(
            &RateLimit {
                metric: Some("bad metric\n".into()),
                limit: Some("1".into()),
                ..Default::default()
            },
            &mut h,
        );
        assert!(h.is_empty());
    }

    #[test]
    fn reset_times_read_as_openai_writes_them() {
        for (seconds, written) in [
            (0, "0s"),
            (45, "45s"),
            (60, "1m0s"),
            (360, "6m0s"),
            (3599, "59m59s"),
            (3600, "1h0m0s"),
            (5400, "1h30m0s"),
            (90061, "25h1m1s"),
        ] {
            assert_eq!(reset_duration(seconds), written, "{seconds} s");
        }
    }
}
