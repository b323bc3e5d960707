//! One relayed request's lifecycle: a task that admits, forwards, and settles or refunds. The
//! task is spawned so that a client hanging up never cancels a reservation half-way: whatever
//! happens to the connection, the task ends with exactly one settle or refund (or, with
//! `--fail-open` and the database away, with none, logged).

use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::db::AdmitItem;
use crate::error::{AppError, DbError};
use crate::openai::Endpoint;
use crate::proxy::ingress::{self, Job};
use crate::proxy::ratelimit::ratelimit_headers;
use crate::proxy::settlement::{settle_or_refund, spawn_settlement, stream_outcome, Outcome};
use crate::proxy::streaming::{pump, stream_response, SseFilter, StreamEnd, STREAM_BUFFER_EVENTS};
use crate::proxy::upstream::{call_upstream, complete_response, Failure, Upstream, UpstreamReply};
use crate::state::AppState;

/// Checks the request, then hands it to a lifecycle task and waits for the response that
/// task produces.
pub async fn handle(
    state: AppState,
    endpoint: Endpoint,
    request_id: String,
    req: Request,
) -> Result<Response, AppError> {
    let job = ingress::read_request(&state, endpoint, request_id, req).await?;
    let (tx, rx) = oneshot::channel();
    state
        .tasks
        .spawn(lifecycle(state.clone(), job, tx).instrument(tracing::Span::current()));
    rx.await.map_err(|_| {
        tracing::error!("lifecycle task ended without a response");
        AppError::Internal
    })
}

/// Counts the in-flight gauge down however the task ends.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn lifecycle(state: AppState, job: Job, reply: oneshot::Sender<Response>) {
    let label = job.endpoint.label();
    let started = Instant::now();
    let admitted = state
        .batcher
        .admit(AdmitItem {
            api_key: job.api_key.clone(),
            request_id: job.request_id.clone(),
            model: job.model.clone(),
            est_input_tokens: job.est_input,
            max_output_tokens: job.max_output,
            channel_id: job.channel_id,
        })
        .await;
    state
        .metrics
        .admit_seconds
        .with_label_values(&[if admitted.is_ok() { "ok" } else { "error" }])
        .observe(started.elapsed().as_secs_f64());

    let admission = match admitted {
        Ok(a) => {
            state.fail_open.database_answered();
            if let (true, Some(key_id)) = (a.allowed, a.key_id) {
                state.fail_open.admitted(&job.api_key, key_id);
            }
            a
        }
        Err(failure) if failure.may_have_committed => {
            // Sent, and no answer came on any attempt: it may hold a reservation after all.
            // The client is answered as for an outage, and the reservation, if there is one,
            // is refunded once the database answers (journaled, like a settlement), so the
            // sweep never charges a request that was refused.
            tracing::warn!(error = %failure.error, "admit outcome unknown after every attempt: it is refunded if it committed");
            spawn_settlement(&state, &job.request_id, Outcome::RefundIfAdmitted);
            return refuse_or_fail_open(state, job, reply, failure.error).await;
        }
        Err(failure) => return refuse_or_fail_open(state, job, reply, failure.error).await,
    };
    let span = tracing::Span::current();
    for (field, value) in [
        ("key_id", admission.key_id),
        ("user_id", admission.user_id),
        ("channel_id", admission.channel_id),
    ] {
        if let Some(v) = value {
            span.record(field, v);
        }
    }
    let ratelimit = admission.ratelimit.clone();

    if !admission.allowed {
        let status = admission
            .http_status
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::FORBIDDEN);
        let err = AppError::Denied {
            status,
            code: admission
                .error_code
                .unwrap_or_else(|| "request_denied".into()),
            message: admission
                .message
                .unwrap_or_else(|| "This request was denied.".into()),
            retry_after_s: admission.retry_after_s,
        };
        tracing::info!(
            status = status.as_u16(),
            code = err.code().as_deref().unwrap_or(""),
            "admit denied the request"
        );
        state.metrics.request(label, err.outcome());
        let mut response = err.into_response();
        ratelimit_headers(&ratelimit, response.headers_mut());
        let _ = reply.send(response);
        return;
    }

    let _in_flight = InFlight::new(&state.metrics.reservations_in_flight);
    // a channel's own upstream gets only its own key: the default key goes to the default URL
    let upstream = match admission.upstream_base_url {
        Some(base_url) => Some(Upstream {
            base_url,
            api_key: admission.upstream_api_key,
            model: admission.upstream_model,
        }),
        None => state.config.upstream_url.clone().map(|base_url| Upstream {
            base_url,
            api_key: admission
                .upstream_api_key
                .or_else(|| state.config.upstream_api_key.clone()),
            model: admission.upstream_model,
        }),
    };
    let Some(upstream) = upstream else {
        tracing::error!("admit named no upstream and --upstream-url is not set");
        settle_or_refund(
            &state,
            &job.request_id,
            Outcome::Refund("no_upstream_configured".into()),
        )
        .await;
        let err = AppError::UpstreamUnavailable("no upstream is configured for this request");
        state.metrics.request(label, err.outcome());
        let _ = reply.send(err.into_response());
        return;
    };
    match call_upstream(&state, &job, &upstream, true).await {
        Err(Failure { error, outcome }) => {
            settle_or_refund(&state, &job.request_id, outcome).await;
            state.metrics.request(label, error.outcome());
            let mut response = error.into_response();
            ratelimit_headers(&ratelimit, response.headers_mut());
            let _ = reply.send(response);
        }
        Ok(UpstreamReply::Complete {
            status,
            content_type,
            body,
            usage,
        }) => {
            state.metrics.request(label, "ok");
            let mut response = complete_response(status, content_type, body);
            ratelimit_headers(&ratelimit, response.headers_mut());
            let _ = reply.send(response);
            // After the reply: the client never waits for the ledger, and this task outlives it.
            settle_or_refund(&state, &job.request_id, Outcome::Settle(usage)).await;
        }
        Ok(UpstreamReply::Stream(upstream_response)) => {
            let hide = job.endpoint.supports_include_usage() && !job.client_wants_usage;
            let (tx, rx) = mpsc::channel(STREAM_BUFFER_EVENTS);
            let mut response = stream_response(rx);
            ratelimit_headers(&ratelimit, response.headers_mut());
            if reply.send(response).is_err() {
                tracing::info!("client left before the stream started");
            }
            let mut filter = SseFilter::new(hide);
            let end = pump(upstream_response, tx, &mut filter).await;
            let outcome = stream_outcome(end, &filter, &job);
            tracing::info!(?end, ?outcome, "stream finished");
            state.metrics.request(
                label,
                if end == StreamEnd::UpstreamFailed {
                    "upstream_error"
                } else {
                    "ok"
                },
            );
            settle_or_refund(&state, &job.request_id, outcome).await;
        }
    }
}

/// An admit that failed: 503 for an outage (or, with `--fail-open`, forwarded unaccounted),
/// the error's own answer otherwise.
async fn refuse_or_fail_open(
    state: AppState,
    job: Job,
    reply: oneshot::Sender<Response>,
    error: DbError,
) {
    let label = job.endpoint.label();
    match error {
        DbError::Unavailable(cause) if state.fail_open.enabled() => {
            match state.fail_open.pass(&job.api_key) {
                Ok(key_id) => {
                    tracing::warn!(
                        request_id = %job.request_id,
                        key_id,
                        %cause,
                        "quota database unreachable: forwarding WITHOUT quota accounting (--fail-open)"
                    );
                    forward_unaccounted(state, job, reply).await;
                }
                Err(refusal) => {
                    tracing::error!(
                        ?refusal,
                        %cause,
                        "admit failed: quota database unreachable, refusing (fail-open does not apply)"
                    );
                    let err = AppError::DatabaseUnavailable;
                    state.metrics.request(label, err.outcome());
                    let _ = reply.send(err.into_response());
                }
            }
        }
        e => {
            if matches!(e, DbError::Unavailable(_)) {
                tracing::error!(error = %e, "admit failed: quota database unavailable, refusing (fail closed)");
            }
            let err = AppError::from(e);
            state.metrics.request(label, err.outcome());
            let _ = reply.send(err.into_response());
        }
    }
}

/// `--fail-open` with the database away: forward as the client asked, no admit, no settle.
async fn forward_unaccounted(state: AppState, job: Job, reply: oneshot::Sender<Response>) {
    let label = job.endpoint.label();
    state.metrics.request(label, "fail_open");
    let Some(base_url) = state.config.upstream_url.clone() else {
        let _ = reply.send(AppError::DatabaseUnavailable.into_response());
        return;
    };
    let upstream = Upstream {
        base_url,
        api_key: state.config.upstream_api_key.clone(),
        model: None,
    };
    let mut response = match call_upstream(&state, &job, &upstream, false).await {
        Err(Failure { error, .. }) => error.into_response(),
        Ok(UpstreamReply::Complete {
            status,
            content_type,
            body,
            ..
        }) => complete_response(status, content_type, body),
        Ok(UpstreamReply::Stream(upstream_response)) => {
            let (tx, rx) = mpsc::channel(STREAM_BUFFER_EVENTS);
            let response = stream_response(rx);
            tokio::spawn(
                async move {
                    let mut filter = SseFilter::new(false);
                    pump(upstream_response, tx, &mut filter).await;
                }
                .in_current_span(),
            );
            response
        }
    };
    response
        .headers_mut()
        .insert("x-pgq-accounting", HeaderValue::from_static("off"));
    let _ = reply.send(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ingress::test_job as job;
    use crate::proxy::streaming::{drain, StreamEnd};
    use crate::proxy::upstream::test_upstream as upstream;
    use crate::state::test_relay;
    use serde_json::json;
    use std::time::Duration;

    #[tokio::test]
    async fn a_client_hanging_up_leaves_the_pump_reading_on_for_the_usage() {
        let mock = crate::mock::spawn_for_tests(50).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::ChatCompletions,
            json!({"model": "gpt-4o", "stream": true, "messages": []}),
            &[("x-mock-chunk-delay-ms", "5")],
        );
        let Ok(UpstreamReply::Stream(resp)) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a stream");
        };
        let (tx, mut rx) = mpsc::channel(1);
        let client = tokio::spawn(async move {
            for _ in 0..4 {
                rx.recv().await.unwrap();
            }
            // then the client leaves
        });
        let mut filter = SseFilter::new(true);
        assert_eq!(pump(resp, tx, &mut filter).await, StreamEnd::ClientGone);
        client.await.unwrap();
        let usage = filter
            .usage
            .expect("the usage chunk, read after the client left");
        assert_eq!(usage.output_tokens, 50);
        assert_eq!(
            stream_outcome(StreamEnd::ClientGone, &filter, &j),
            Outcome::Settle(usage)
        );
    }

    #[tokio::test]
    async fn upstream_cut_mid_stream_tells_the_client_and_charges_the_reservation() {
        let mock = crate::mock::spawn_for_tests(8).await;
        let state = test_relay(false, None, Duration::from_secs(10));
        let j = job(
            Endpoint::ChatCompletions,
            json!({"model": "gpt-4o", "stream": true, "messages": []}),
            &[("x-mock-fail", "disconnect-mid-stream")],
        );
        let Ok(UpstreamReply::Stream(resp)) =
            call_upstream(&state, &j, &upstream(&mock, None), true).await
        else {
            panic!("expected a stream");
        };
        let (tx, rx) = mpsc::channel(4);
        let client = tokio::spawn(drain(rx));
        let mut filter = SseFilter::new(true);
        assert_eq!(pump(resp, tx, &mut filter).await, StreamEnd::UpstreamFailed);
        let shown = client.await.unwrap();
        assert!(
            shown.trim_end().ends_with("}}"),
            "ends with an error event: {shown}"
        );
        assert!(shown.contains("upstream_unavailable"));
        assert_eq!(filter.text, crate::mock::wire::output_text(4));
        assert_eq!(
            stream_outcome(StreamEnd::UpstreamFailed, &filter, &j),
            Outcome::Settle(j.reservation())
        );
    }
}
