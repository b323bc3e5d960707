//! The relayed request, room by room: `ingress` (key, body, headers, estimates), `lifecycle`
//! (the task that admits, forwards and settles), `upstream` (the call and its errors),
//! `batcher` (admits and settlements coalesced into batches), `streaming` (SSE pass-through with usage capture), `settlement` (outcomes and the settle or
//! refund call), `ratelimit` (headers) and `models` (`GET /v1/models`).

pub mod batcher;
pub mod ingress;
pub mod journal;
pub mod lifecycle;
pub mod models;
pub mod ratelimit;
pub mod settlement;
pub mod streaming;
pub mod upstream;
