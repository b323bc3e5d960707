//! Prometheus metrics, in a registry owned by the app (so tests can build many apps).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

const DB_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const UPSTREAM_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// by endpoint and outcome (ok, quota_exceeded, denied, unauthorized, bad_request,
    /// upstream_error, database_unavailable, fail_open, internal_error)
    pub requests: IntCounterVec,
    pub admit_seconds: HistogramVec,
    /// by call: settle | refund
    pub settle_seconds: HistogramVec,
    /// time until the upstream's response headers, by endpoint
    pub upstream_seconds: HistogramVec,
    /// admitted requests whose settle/refund has not completed yet
    pub reservations_in_flight: IntGauge,
    /// settle/refund calls that failed after every retry, by call
    pub settlement_failures: IntCounterVec,
    /// settlements the engine recorded unbilled, by its reason (price_not_found, usage_missing)
    pub unbilled: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "pgq_relay_requests_total",
                "Relayed requests by endpoint and outcome",
            ),
            &["endpoint", "outcome"],
        )
        .expect("valid metric");
        let admit_seconds = HistogramVec::new(
            HistogramOpts::new("pgq_relay_admit_seconds", "Latency of quota.admit")
                .buckets(DB_BUCKETS.to_vec()),
            &["result"],
        )
        .expect("valid metric");
        let settle_seconds = HistogramVec::new(
            HistogramOpts::new(
                "pgq_relay_settle_seconds",
                "Latency of quota.settle and quota.refund",
            )
            .buckets(DB_BUCKETS.to_vec()),
            &["call"],
        )
        .expect("valid metric");
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "pgq_relay_upstream_seconds",
                "Time until the upstream's response headers",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        let reservations_in_flight = IntGauge::new(
            "pgq_relay_reservations_in_flight",
            "Admitted requests not yet settled or refunded",
        )
        .expect("valid metric");
        let settlement_failures = IntCounterVec::new(
            Opts::new(
                "pgq_relay_settlement_failures_total",
                "settle/refund calls that failed after all retries (the sweep releases them)",
            ),
            &["call"],
        )
        .expect("valid metric");
        let unbilled = IntCounterVec::new(
            Opts::new(
                "pgq_relay_unbilled_requests_total",
                "Requests settled without a charge, by the engine's reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(admit_seconds.clone()),
            Box::new(settle_seconds.clone()),
            Box::new(upstream_seconds.clone()),
            Box::new(reservations_in_flight.clone()),
            Box::new(settlement_failures.clone()),
            Box::new(unbilled.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            requests,
            admit_seconds,
            settle_seconds,
            upstream_seconds,
            reservations_in_flight,
            settlement_failures,
            unbilled,
        }
    }

    pub fn request(&self, endpoint: &str, outcome: &str) {
        self.requests.with_label_values(&[endpoint, outcome]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of metrics");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
