//! Natural batching of lifecycle calls (`--batch-max`): concurrent admits go to the database as
//! one `quota.admit_many`, concurrent settlements as one `quota.settle_many`, one transaction
//! and one commit for the lot.
//!
//! No timer: a call made while no other call of its kind is in flight goes at once, alone, as
//! the single call (so a lone request pays nothing for batching). Otherwise it joins a queue;
//! the queue's dispatcher takes the first call, waits for one of a few batch slots
//! ([`BATCHES_IN_FLIGHT`]) and a pooled connection, then takes whatever else is queued by then
//! (up to `--batch-max`) and sends it as one batch on that connection. Under load, the calls
//! that queue while the batches in flight run go together. The engine answers a batch's
//! items as the same single calls made in that order would be answered.
//!
//! A batch that fails as a whole (the database away, a deadlock or serialization failure, no
//! answer in time) is answered per item by the single call (`db::admit`, `db::settle`), with
//! its own retries: each item ends exactly as if it had never been batched. (An admit batch
//! whose outcome is unknown may have committed: the single admit of the same request id then
//! gets the original decision back, holding nothing twice; a settle is idempotent.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use crate::db::{self, Admission, AdmitFailure, AdmitItem, SettleItem, Settlement};
use crate::error::DbError;

/// `--batch-max`'s default.
pub const DEFAULT_BATCH_MAX: usize = 64;
/// The same, as the command-line flag reads it.
pub const DEFAULT_BATCH_MAX_FLAG: u16 = DEFAULT_BATCH_MAX as u16;

/// Batches of one kind (admits, settlements) running at once: few, so that under load calls
/// queue and go together instead of each finding a free connection and going alone.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// Calls of one kind in flight, counted while its guard lives.
struct InFlight(std::sync::Arc<AtomicUsize>);

impl InFlight {
    /// Counts a call in; true when it is the only one.
    fn enter(counter: &std::sync::Arc<AtomicUsize>) -> (InFlight, bool) {
        let alone = counter.fetch_add(1, Ordering::AcqRel) == 0;
        (InFlight(counter.clone()), alone)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A queued call and where its answer goes: `E` is the single call's error (an admit's says
/// whether it may have committed; a batch's own errors never leave that unknown).
struct Job<I, A, E> {
    item: I,
    reply: oneshot::Sender<Result<A, E>>,
}

/// A queue and its dispatcher, started on first use (inside the runtime).
struct Queue<I, A, E> {
    tx: mpsc::UnboundedSender<Job<I, A, E>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job<I, A, E>>>>,
    in_flight: std::sync::Arc<AtomicUsize>,
}

impl<I, A, E> Queue<I, A, E> {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Queue {
            tx,
            rx: Mutex::new(Some(rx)),
            in_flight: std::sync::Arc::new(AtomicUsize::new(0)),
        }
    }

    fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Job<I, A, E>>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub struct Batcher {
    pool: Pool,
    max: usize,
    admits: Queue<AdmitItem, Admission, AdmitFailure>,
    settles: Queue<SettleItem, Settlement, DbError>,
}

impl Batcher {
    /// `max` items per batch at most; 1 turns batching off (every call goes alone).
    pub fn new(pool: Pool, max: usize) -> Self {
        Batcher {
            pool,
            max: max.max(1),
            admits: Queue::new(),
            settles: Queue::new(),
        }
    }

    pub async fn admit(&self, item: AdmitItem) -> Result<Admission, AdmitFailure> {
        let (_counted, alone) = InFlight::enter(&self.admits.in_flight);
        if self.max == 1 || alone {
            return db::admit(&self.pool, &item.args()).await;
        }
        if let Some(rx) = self.admits.take_receiver() {
            tokio::spawn(dispatch(self.pool.clone(), self.max, rx, run_admits));
        }
        submit(&self.admits, item).await
    }

    pub async fn settle(&self, item: SettleItem) -> Result<Settlement, DbError> {
        let (_counted, alone) = InFlight::enter(&self.settles.in_flight);
        if self.max == 1 || alone {
            return settle_alone(self.pool.clone(), item).await;
        }
        if let Some(rx) = self.settles.take_receiver() {
            tokio::spawn(dispatch(self.pool.clone(), self.max, rx, run_settles));
        }
        submit(&self.settles, item).await
    }
}

async fn submit<I, A, E: From<DbError>>(queue: &Queue<I, A, E>, item: I) -> Result<A, E> {
    let (reply, answer) = oneshot::channel();
    if queue.tx.send(Job { item, reply }).is_err() {
        return Err(DbError::Unavailable("the relay's batching has stopped".into()).into());
    }
    answer.await.unwrap_or_else(|_| {
        Err(DbError::Unavailable("the relay's batching has stopped".into()).into())
    })
}

/// Takes the first queued call, waits for a connection, then takes whatever else is queued by
/// then (up to `max`) and runs it as one batch on that connection, in a task of its own.
async fn dispatch<I, A, E, F, Fut>(
    pool: Pool,
    max: usize,
    mut rx: mpsc::UnboundedReceiver<Job<I, A, E>>,
    run: F,
) where
    I: Send + 'static,
    A: Send + 'static,
    E: Send + 'static,
    F: Fn(Pool, Result<deadpool_postgres::Object, DbError>, Vec<Job<I, A, E>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let client = pool.get().await.map_err(DbError::from);
        let mut jobs = vec![first];
        while jobs.len() < max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let batch = run(pool.clone(), client, jobs);
        tokio::spawn(async move {
            batch.await;
            drop(slot);
        });
    }
}

/// Answers each job by its single call, concurrently (a batch of one, or a failed batch).
fn answer_alone<I, A, E, Fut>(jobs: Vec<Job<I, A, E>>, call: impl Fn(I) -> Fut)
where
    I: Send + 'static,
    A: Send + 'static,
    E: Send + 'static,
    Fut: std::future::Future<Output = Result<A, E>> + Send + 'static,
{
    for job in jobs {
        let answer = call(job.item);
        tokio::spawn(async move {
            let _ = job.reply.send(answer.await);
        });
    }
}

/// Sends each answer to its job; with the batch failed as a whole, answers each by its single
/// call instead.
fn answer<I, A, E: From<DbError>>(
    jobs: Vec<Job<I, A, E>>,
    items: Vec<I>,
    batch: Result<Vec<Result<A, DbError>>, DbError>,
    alone: impl Fn(Vec<Job<I, A, E>>),
) {
    match batch {
        Ok(answers) => {
            // the batch committed: each item's answer is known, its error included
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.reply.send(answer.map_err(E::from));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, items = items.len(), "a batch failed as a whole; answering its items one by one");
            let jobs = jobs
                .into_iter()
                .zip(items)
                .map(|(job, item)| Job {
                    item,
                    reply: job.reply,
                })
                .collect();
            alone(jobs);
        }
    }
}

/// Answers every job with the pool's error, as a single call that could not get a connection
/// is answered.
fn no_connection<I, A, E: From<DbError>>(jobs: Vec<Job<I, A, E>>, e: DbError) {
    for job in jobs {
        let _ = job.reply.send(Err(e.clone().into()));
    }
}

async fn admit_alone(pool: Pool, item: AdmitItem) -> Result<Admission, AdmitFailure> {
    db::admit(&pool, &item.args()).await
}

async fn settle_alone(pool: Pool, item: SettleItem) -> Result<Settlement, DbError> {
    db::settle(
        &pool,
        &item.request_id,
        item.input_tokens,
        item.output_tokens,
        item.cached_tokens,
    )
    .await
}

async fn run_admits(
    pool: Pool,
    client: Result<deadpool_postgres::Object, DbError>,
    jobs: Vec<Job<AdmitItem, Admission, AdmitFailure>>,
) {
    let alone = |jobs| answer_alone(jobs, |item| admit_alone(pool.clone(), item));
    match client {
        Ok(client) if jobs.len() > 1 => {
            let items: Vec<AdmitItem> = jobs.iter().map(|j| j.item.clone()).collect();
            let batch = db::admit_many(client, &items).await;
            answer(jobs, items, batch, alone);
        }
        Ok(client) => {
            drop(client); // a batch of one: the single call, on the connection just freed
            alone(jobs);
        }
        // no connection came: what the single call would answer (it was not sent)
        Err(e) => no_connection(jobs, e),
    }
}

async fn run_settles(
    pool: Pool,
    client: Result<deadpool_postgres::Object, DbError>,
    jobs: Vec<Job<SettleItem, Settlement, DbError>>,
) {
    let alone = |jobs| answer_alone(jobs, |item| settle_alone(pool.clone(), item));
    match client {
        Ok(client) if jobs.len() > 1 => {
            let items: Vec<SettleItem> = jobs.iter().map(|j| j.item.clone()).collect();
            let batch = db::settle_many(client, &items).await;
            answer(jobs, items, batch, alone);
        }
        Ok(client) => {
            drop(client); // a batch of one: the single call, on the connection just freed
            alone(jobs);
        }
        // no connection came: what the single call would answer (it was not sent)
        Err(e) => no_connection(jobs, e),
    }
}
