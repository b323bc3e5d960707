//! Settlement: what a finished request costs (its outcome) and the settle or refund call that
//! records it, retried while the database is away.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use crate::db;
use crate::error::DbError;
use crate::estimate::Tokenizer;
use crate::openai::Usage;
use crate::proxy::ingress::Job;
use crate::proxy::journal::Call;
use crate::proxy::streaming::{SseFilter, StreamEnd};
use crate::state::AppState;
use tracing::Instrument;

/// Backoff between settlement attempts: from the first, times four, at most the last.
const SETTLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// What the relay does with the reservation once the upstream has answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Settle(Usage),
    Refund(Cow<'static, str>),
    /// The admit's outcome stayed unknown and the client got 503: if the admit committed after
    /// all, its reservation is refunded (the sweep would otherwise charge a refused request).
    RefundIfAdmitted,
}

/// The refund reason of [`Outcome::RefundIfAdmitted`].
pub const ADMIT_OUTCOME_UNKNOWN: &str = "admit_outcome_unknown";

impl Outcome {
    fn journal_call(&self) -> Call {
        match self {
            Outcome::Settle(usage) => Call::Settle { usage: *usage },
            Outcome::Refund(reason) => Call::Refund {
                reason: reason.to_string(),
            },
            Outcome::RefundIfAdmitted => Call::RefundIfAdmitted,
        }
    }

    /// The call's label in logs and metrics.
    fn call(&self) -> &'static str {
        match self {
            Outcome::Settle(_) => "settle",
            Outcome::Refund(_) => "refund",
            Outcome::RefundIfAdmitted => "refund_if_admitted",
        }
    }
}

impl From<Call> for Outcome {
    fn from(call: Call) -> Self {
        match call {
            Call::Settle { usage } => Outcome::Settle(usage),
            Call::Refund { reason } => Outcome::Refund(reason.into()),
            Call::RefundIfAdmitted => Outcome::RefundIfAdmitted,
        }
    }
}

/// What a finished stream costs: the upstream's usage when it sent one. Otherwise, a stream the
/// upstream completed is charged the estimated input plus the output counted by the relay; one
/// that broke off upstream or that the client left (the relay then reads it to its end for the
/// usage) is an unknown outcome, charged its whole reservation.
pub fn stream_outcome(end: StreamEnd, filter: &SseFilter, job: &Job) -> Outcome {
    if let Some(usage) = filter.usage {
        return Outcome::Settle(usage);
    }
    match end {
        StreamEnd::Completed => Outcome::Settle(Usage {
            input_tokens: job.est_input,
            output_tokens: Tokenizer::for_model(&job.model).count(&filter.text),
            cached_tokens: 0,
        }),
        StreamEnd::UpstreamFailed | StreamEnd::ClientGone => Outcome::Settle(job.reservation()),
    }
}

/// Settle or refund, retrying transient failures (database unreachable or busy, a conflict)
/// with backoff for `--settle-retry-s`. A settle that arrives after the sweep charged the
/// reservation at its full amount corrects that charge to the measured usage (or, where the
/// sweep released it, is still charged), and a repeated call changes nothing, so retrying is
/// always safe. While it runs it is pending in the journal; retries run out, it stays there
/// (with `--state-dir`, written at shutdown and replayed at the next start) or, without a state
/// directory, is lost: logged at ERROR and counted. A refund of an admit whose outcome was
/// unknown that finds no such request (PQ404) is done: that admit never committed.
pub async fn settle_or_refund(
    state: &AppState,
    request_id: &str,
    outcome: Outcome,
) -> Option<db::Settlement> {
    let call = outcome.call();
    state.journal.begin(request_id, outcome.journal_call());
    let (mut delay, max_delay) = SETTLE_BACKOFF;
    let give_up = Instant::now() + state.config.settle_retry;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = match &outcome {
            Outcome::Settle(u) => state
                .batcher
                .settle(db::SettleItem {
                    request_id: request_id.to_string(),
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cached_tokens: u.cached_tokens,
                })
                .await
                .map(Some),
            Outcome::Refund(reason) => {
                db::refund(&state.pool, request_id, reason)
                    .await
                    .map(|refunded| {
                        tracing::info!(%reason, refunded, "reservation refunded");
                        None
                    })
            }
            Outcome::RefundIfAdmitted => {
                match db::refund(&state.pool, request_id, ADMIT_OUTCOME_UNKNOWN).await {
                    Ok(refunded) => {
                        tracing::warn!(refunded, "the admit whose outcome was unknown had committed: reservation refunded");
                        Ok(None)
                    }
                    Err(DbError::Sql { code, .. }) if code == "PQ404" => {
                        tracing::info!("the admit whose outcome was unknown had not committed: nothing to refund");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        state
            .metrics
            .settle_seconds
            .with_label_values(&[call])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(settlement) => {
                state.journal.done(request_id);
                if let Some(s) = &settlement {
                    tracing::info!(
                        settled = s.settled,
                        billed = s.billed,
                        unbilled_reason = s.unbilled_reason.as_deref().unwrap_or(""),
                        cost = s.cost.as_deref().unwrap_or(""),
                        replay = s.replay,
                        "reservation settled"
                    );
                    if !s.billed && !s.replay {
                        let reason = s.unbilled_reason.as_deref().unwrap_or("unknown");
                        state.metrics.unbilled.with_label_values(&[reason]).inc();
                    }
                }
                return settlement;
            }
            Err(e) if e.is_transient() && Instant::now() + delay < give_up => {
                tracing::warn!(call, attempt, error = %e, "settlement failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 4).min(max_delay);
            }
            Err(e) if e.is_transient() && state.journal.is_durable() => {
                tracing::error!(
                    call,
                    attempt,
                    error = %e,
                    ?outcome,
                    "settlement not recorded yet: kept in the journal for the next start"
                );
                return None;
            }
            Err(e) => {
                state.journal.done(request_id);
                state
                    .metrics
                    .settlement_failures
                    .with_label_values(&[call])
                    .inc();
                tracing::error!(
                    call,
                    attempt,
                    error = %e,
                    ?outcome,
                    "SETTLEMENT LOST: the reservation stays until quota.sweep() charges it at its reservation (or releases it, per pg_quota.expired_reservations)"
                );
                return None;
            }
        }
    }
}

/// `settle_or_refund` as a task of its own, which shutdown waits for; pending in the journal
/// at once, so a shutdown before the task runs still keeps it.
pub fn spawn_settlement(state: &AppState, request_id: &str, outcome: Outcome) {
    state.journal.begin(request_id, outcome.journal_call());
    let (state2, request_id) = (state.clone(), request_id.to_string());
    state.tasks.spawn(
        async move { settle_or_refund(&state2, &request_id, outcome).await }.in_current_span(),
    );
}

/// Replays the settlements the journal kept at the last shutdown, each as its own tracked task.
pub fn replay_journal(state: &AppState) -> Result<usize, String> {
    let entries = state.journal.load()?;
    for entry in &entries {
        tracing::info!(request_id = %entry.request_id, "replaying a journaled settlement");
        spawn_settlement(state, &entry.request_id, entry.call.clone().into());
    }
    Ok(entries.len())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_relay;

    #[tokio::test]
    async fn a_settlement_is_retried_for_settle_retry_then_given_up_and_counted() {
        // the test relay's database refuses connections; it retries settlements for 1 s
        let state = test_relay(false, None, Duration::from_secs(10));
        let started = Instant::now();
        let usage = Usage {
            input_tokens: 1,
            output_tokens: 1,
            cached_tokens: 0,
        };
        assert!(settle_or_refund(&state, "req_x", Outcome::Settle(usage))
            .await
            .is_none());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let failures = state
            .metrics
            .settlement_failures
            .with_label_values(&["settle"])
            .get();
        assert_eq!(failures, 1);
    }

    #[test]
    fn stream_outcomes_charge_usage_else_the_count_or_the_reservation() {
        let job = crate::proxy::ingress::test_job(
            crate::openai::Endpoint::ChatCompletions,
            serde_json::json!({"model": "my-model", "messages": []}),
            &[],
        );
        let reservation = Outcome::Settle(Usage {
            input_tokens: 10,
            output_tokens: 100,
            cached_tokens: 0,
        });
        // usage chunk wins, whatever happened to the connection
        let mut f = SseFilter::new(true);
        f.push(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
        );
        for end in [
            StreamEnd::Completed,
            StreamEnd::ClientGone,
            StreamEnd::UpstreamFailed,
        ] {
            assert_eq!(
                stream_outcome(end, &f, &job),
                Outcome::Settle(Usage {
                    input_tokens: 5,
                    output_tokens: 2,
                    cached_tokens: 0
                })
            );
        }
        // completed without usage: estimated input + counted output
        let mut f = SseFilter::new(true);
        f.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\n");
        assert_eq!(
            stream_outcome(StreamEnd::Completed, &f, &job),
            Outcome::Settle(Usage {
                input_tokens: 10,
                output_tokens: 2,
                cached_tokens: 0
            })
        );
        // cut off upstream or left by the client, without usage: the whole reservation,
        // with or without content
        let empty = SseFilter::new(true);
        for filter in [&f, &empty] {
            for end in [StreamEnd::UpstreamFailed, StreamEnd::ClientGone] {
                assert_eq!(stream_outcome(end, filter, &job), reservation);
            }
        }
    }
}
