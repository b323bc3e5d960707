-- Batched admission and settlement (issue 19): many lifecycle calls in one transaction and one
-- commit, for gateways that coalesce concurrent requests (the relay's --batch-max). Arrays in,
-- one row per item out, numbered from 1 in array order (`ordinal`). Items are decided in array
-- order, each seeing what the items before it held and settled: the answers are those of the
-- same single calls made one by one in that order (quota.admit and quota.settle are batches of
-- one of the same code, src/lifecycle/batch.rs). The batch locks every counter it touches once,
-- up front, in the lock order of 40_lifecycle.sql, so batches cannot deadlock one another.
--
-- An item that the single call would refuse with an error (SQLSTATE class PQ: bad arguments, a
-- reused request id, also one named by an earlier item of the batch; at settle an unknown or
-- refunded request id) is answered in its row instead: `sqlstate` and `message` say what the
-- single call would have raised, and the other items go on. Arrays of different lengths refuse
-- the whole call (PQ400). Any other error (a deadlock, a serialization failure) rolls the whole
-- batch back: run its items again.

CREATE FUNCTION quota.admit_many(api_keys text[], request_ids text[], models text[],
                                 est_input_tokens bigint[], max_output_tokens bigint[],
                                 channel_ids bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, allowed boolean, http_status integer, error_code text, message text,
               retry_after_s integer, key_id bigint, user_id bigint, channel_id bigint,
               upstream_base_url text, upstream_api_key text, upstream_model text,
               ratelimit_limit numeric, ratelimit_remaining numeric, ratelimit_metric text,
               ratelimit_reset_at timestamptz, sqlstate text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'admit_many_wrapper';

CREATE FUNCTION quota.settle_many(request_ids text[], input_tokens bigint[], output_tokens bigint[],
                                  cached_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, settled boolean, billed boolean, unbilled_reason text, cost numeric,
               replay boolean, sqlstate text, message text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'settle_many_wrapper';
