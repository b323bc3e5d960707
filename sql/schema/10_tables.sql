-- pg_quota tables. Everything lives in schema quota (@extschema@).
-- Counters are updated on every request: they carry no index but their primary key, and a
-- lower fillfactor, so those updates stay HOT.

CREATE TABLE quota.app_user (
    user_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name <> ''),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE quota.app_user IS 'Users own API keys; user policies cover all of their keys.';

-- A key is sk-pgq-<public_id>-<secret>. Only sha256(secret) is stored; public_id finds the row.
CREATE TABLE quota.api_key (
    key_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id            bigint NOT NULL REFERENCES quota.app_user ON DELETE CASCADE,
    name               text NOT NULL,
    public_id          text NOT NULL UNIQUE,
    secret_hash        bytea NOT NULL,
    enabled            boolean NOT NULL DEFAULT true,
    expires_at         timestamptz,
    -- Set by a policy with on_exhausted = 'disable'; the key resumes by itself at this instant.
    suspended_until    timestamptz,
    suspended_by       bigint,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON quota.api_key (user_id);
-- The sweep's search for suspensions that ran out: only suspended keys are in it.
CREATE INDEX ON quota.api_key (suspended_until) WHERE suspended_until IS NOT NULL;
COMMENT ON COLUMN quota.api_key.suspended_until IS
    'Set when an on_exhausted = ''disable'' policy is exhausted; cleared lazily by admit or by quota.sweep() once passed.';

-- Prices per million tokens, exact decimals. cached_input NULL means "same as input". A price
-- is a finite number (NaN compares above every number, and Infinity would block every request).
-- A model without a row of its own is priced by an alias or by its base name (quota.price_for).
CREATE TABLE quota.model_price (
    model                  text PRIMARY KEY CHECK (model <> ''),
    input_per_mtok         numeric NOT NULL CHECK (input_per_mtok >= 0 AND input_per_mtok < 'Infinity'),
    output_per_mtok        numeric NOT NULL CHECK (output_per_mtok >= 0 AND output_per_mtok < 'Infinity'),
    cached_input_per_mtok  numeric CHECK (cached_input_per_mtok >= 0 AND cached_input_per_mtok < 'Infinity'),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- Other names of priced models (a gateway's alias, a renamed snapshot): a request for `alias`
-- is held and charged at the price of `model`.
CREATE TABLE quota.model_alias (
    alias  text PRIMARY KEY CHECK (alias <> ''),
    model  text NOT NULL REFERENCES quota.model_price ON UPDATE CASCADE ON DELETE CASCADE
);
COMMENT ON TABLE quota.model_alias IS
    'A request for alias is priced as model. An exact price of the alias itself wins; see quota.price_for.';

-- The days on which a model without a price was requested: the first request of the day writes
-- the row and an unpriced_model event; the primary key makes that once, whatever the
-- concurrency. The sweep deletes rows older than yesterday.
CREATE TABLE quota.unpriced_model_day (
    day    date NOT NULL,
    model  text NOT NULL,
    PRIMARY KEY (day, model)
);

-- User groups: a group's policies apply to each member on its own (per-member amounts).
CREATE TABLE quota.user_group (
    group_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE quota.user_group_member (
    group_id  bigint NOT NULL REFERENCES quota.user_group ON DELETE CASCADE,
    user_id   bigint NOT NULL REFERENCES quota.app_user ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX ON quota.user_group_member (user_id);

-- Model groups: named sets of models. A model belongs to at most one group (the primary key on
-- model_group_member.model); a trigger names the group that already holds it.
CREATE TABLE quota.model_group (
    model_group_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name <> ''),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE quota.model_group_member (
    model           text PRIMARY KEY CHECK (model <> ''),
    model_group_id  bigint NOT NULL REFERENCES quota.model_group ON DELETE CASCADE
);
CREATE INDEX ON quota.model_group_member (model_group_id);

-- Upstream channels (accounts). api_key is the upstream's secret: only quota.admit reads it
-- (for the relay role); admins may write it but no role but the owner may SELECT it.
CREATE TABLE quota.channel (
    channel_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    base_url    text NOT NULL CHECK (base_url ~ '^https?://'),
    api_key     text,
    priority    integer NOT NULL DEFAULT 0,
    weight      integer NOT NULL DEFAULT 1 CHECK (weight > 0),
    status      text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE quota.channel IS
    'Upstream accounts. Routing picks, among enabled channels serving the model and under all their caps (policies with subject_type = ''channel''), the highest priority, then at random by weight.';
COMMENT ON COLUMN quota.channel.api_key IS 'The upstream secret; readable only through quota.admit.';

-- Who may pin a channel (quota.admit's channel_id): a key, a user (all of its keys) or a user
-- group (all of its members' keys). Without a grant a pinned request gets 403
-- channel_not_allowed; routing by priority needs none.
CREATE TABLE quota.channel_grant (
    channel_id    bigint NOT NULL REFERENCES quota.channel ON DELETE CASCADE,
    subject_type  text NOT NULL,
    subject_id    bigint NOT NULL,
    PRIMARY KEY (channel_id, subject_type, subject_id)
);

-- The models a channel serves; upstream_model renames the model on the way out (NULL: same name).
CREATE TABLE quota.channel_model (
    channel_id      bigint NOT NULL REFERENCES quota.channel ON DELETE CASCADE,
    model           text NOT NULL CHECK (model <> ''),
    upstream_model  text CHECK (upstream_model <> ''),
    PRIMARY KEY (model, channel_id)
);

CREATE TABLE quota.policy (
    policy_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text,
    subject_type   text NOT NULL,
    subject_id     bigint NOT NULL,
    -- NULL: every model (a global policy); otherwise only requests for models of this group.
    model_group    bigint REFERENCES quota.model_group ON DELETE RESTRICT,
    metric         text NOT NULL DEFAULT 'cost',
    period         text NOT NULL,
    period_minutes integer,
    window_mode    text NOT NULL DEFAULT 'fixed',
    anchor         timestamptz NOT NULL DEFAULT quota.clock(),
    time_zone      text NOT NULL DEFAULT 'UTC',
    week_start     smallint NOT NULL DEFAULT 1,
    reset_hour     smallint NOT NULL DEFAULT 0,
    quota_limit    numeric NOT NULL,
    boundary       text NOT NULL DEFAULT 'strict',
    on_exhausted   text NOT NULL DEFAULT 'reject',
    exclusive      boolean NOT NULL DEFAULT false,
    enabled        boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- (issue 20) added after 0.1.0, so last: an upgraded table has them in this order too
    enforce        boolean NOT NULL DEFAULT true,
    alert_at       numeric[]
);
CREATE INDEX ON quota.policy (subject_type, subject_id) WHERE enabled;
COMMENT ON TABLE quota.policy IS
    'One quota rule. Admins INSERT/UPDATE/DELETE rows; a trigger refuses invalid rows naming the column.';
COMMENT ON COLUMN quota.policy.exclusive IS
    'Billing isolation for a model-group policy: spend it covers is not counted again by the same subject''s global policies (same axis: key, or user with its groups).';
COMMENT ON COLUMN quota.policy.anchor IS
    'Aligns 5h and minutes windows, gives month windows their day-of-month, and starts total windows. Manual reset never moves it.';
COMMENT ON COLUMN quota.policy.week_start IS 'ISO weekday a week window starts on: 1 = Monday … 7 = Sunday.';
COMMENT ON COLUMN quota.policy.reset_hour IS 'Local hour (0-23, in time_zone) at which day, week and month windows start.';
COMMENT ON COLUMN quota.policy.enforce IS
    'false: shadow mode. The policy is counted and shows in quota.status, but never refuses or suspends; a shadow_refusal event is logged once per window when it would have refused.';
COMMENT ON COLUMN quota.policy.alert_at IS
    'Alert thresholds, fractions of the effective limit in (0, 1], e.g. {0.8,0.95,1}: settled usage crossing one logs a threshold_crossed event, once per threshold and window. NULL or empty: none.';

-- Temporary grants that add to the effective limit of the matching policies (same axis and
-- subject, model group, metric and period) while starts_at <= now < expires_at.
CREATE TABLE quota.boost (
    boost_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject_type    text NOT NULL,
    subject_id      bigint NOT NULL,
    model_group     bigint REFERENCES quota.model_group ON DELETE CASCADE,
    metric          text NOT NULL DEFAULT 'cost',
    period          text NOT NULL,
    period_minutes  integer,
    amount          numeric NOT NULL,
    starts_at       timestamptz NOT NULL DEFAULT quota.clock(),
    expires_at      timestamptz NOT NULL,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON quota.boost (subject_type, subject_id);

-- Live counter of one policy for one scope (the key, the user, …) in its current window.
-- used counts settled usage of the window starting at window_start; reserved counts holds of
-- in-flight requests and survives window roll-over and manual reset (their settle releases it).
-- exhausted_at is when the window was found spent (logged and acted on once). The mark holds
-- while it is not older than window_start: a mark from before is a window that has ended since,
-- and the next admit or settle of the scope, or the sweep, logs its recovery and clears it; so
-- does admit for a window no longer spent (a boost, a rolling window's usage ageing out). A
-- rolling window's usage is in quota.rolling_usage: its counter has window_start -infinity and
-- never rolls.
CREATE TABLE quota.counter (
    policy_id     bigint NOT NULL REFERENCES quota.policy ON DELETE CASCADE,
    scope_id      bigint NOT NULL,
    window_start  timestamptz NOT NULL,
    used          numeric NOT NULL DEFAULT 0 CHECK (used >= 0),
    reserved      numeric NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    exhausted_at  timestamptz,
    reset_at      timestamptz,  -- last cleared (quota.clear_usage): quota.drift counts the ledger from here
    -- (issue 20) the highest alert threshold (policy.alert_at) that the usage of the counter's
    -- window alert_window has reached and logged; shadow_refused_at: when a shadow policy's
    -- window was logged as refusing (once per window: a mark older than the window's start is
    -- an ended window's). Quota.clear_usage and policy edits clear both.
    alert_level       numeric,
    alert_window      timestamptz,
    shadow_refused_at timestamptz,
    PRIMARY KEY (policy_id, scope_id)
) WITH (fillfactor = 70);
-- The sweep finds marked windows through this index. Requests do not change exhausted_at
-- (except when a window is found spent or recovers), so their updates stay HOT.
CREATE INDEX ON quota.counter (policy_id) WHERE exhausted_at IS NOT NULL;

-- Rolling windows: settled usage per one-minute bucket; the window sums the buckets it covers.
CREATE TABLE quota.rolling_usage (
    policy_id  bigint NOT NULL REFERENCES quota.policy ON DELETE CASCADE,
    scope_id   bigint NOT NULL,
    bucket     timestamptz NOT NULL,
    used       numeric NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (policy_id, scope_id, bucket)
) WITH (fillfactor = 70);

-- In-flight requests: one row from admit until settle/refund/sweep. hold_* are parallel arrays:
-- the amount reserved on each policy's counter. channel_id is the channel admit routed to.
CREATE TABLE quota.reservation (
    request_id        text PRIMARY KEY,
    key_id            bigint NOT NULL,
    user_id           bigint NOT NULL,
    channel_id        bigint,
    model             text NOT NULL,
    counted_in_key_global   boolean NOT NULL,
    counted_in_user_global  boolean NOT NULL,
    est_input_tokens  bigint NOT NULL,
    max_output_tokens bigint NOT NULL,
    hold_policy       bigint[] NOT NULL,
    hold_scope        bigint[] NOT NULL,
    hold_amount       numeric[] NOT NULL,
    hold_limit        numeric[] NOT NULL,  -- each policy's effective limit at admit
    created_at        timestamptz NOT NULL
);
-- No index but the primary key: the table holds only requests in flight, and every index is
-- written twice per request (admit inserts, settle deletes); the sweep scans it whole.

-- Requests whose reservation was released without a settle: refunded, or expired by the sweep
-- with pg_quota.expired_reservations = 'release' (by default it charges them: quota.usage_ledger).
-- The sweep deletes rows older than pg_quota.released_retention (by released_at).
CREATE TABLE quota.released (
    request_id   text PRIMARY KEY,
    key_id       bigint NOT NULL,
    user_id      bigint NOT NULL,
    channel_id   bigint,
    model        text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('refunded', 'expired')),
    reason       text,
    released_at  timestamptz NOT NULL
);
CREATE INDEX ON quota.released (released_at);

-- Append-only: one row per settled request. counted_* say what each policy counter received:
-- counted_window is the window's start (fixed windows) or the minute bucket (rolling windows).
-- settled_by: 'settle' (measured usage), 'sweep' (an expired reservation charged at its
-- estimate), 'correction' (a late settle or refund of a swept request: the difference between
-- the measured usage and the sweep's charge, which may be negative; it adds no request).
-- Partitioned by settled_at (sql/schema/70_ledger.sql): quota.maintain_ledger, run by the sweep,
-- makes a partition per day or week (pg_quota.ledger_partition) ahead of time, files rows the
-- default partition caught into partitions, and archives or drops partitions older than
-- pg_quota.ledger_retention. A request id is unique in the ledger while quota.ledger_request
-- remembers it; no index of the ledger holds request ids, so its cost does not grow with age.
CREATE TABLE quota.usage_ledger (
    ledger_id        bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order; not indexed
    request_id       text NOT NULL,
    settled_by       text NOT NULL DEFAULT 'settle' CHECK (settled_by IN ('settle', 'sweep', 'correction')),
    key_id           bigint NOT NULL,
    user_id          bigint NOT NULL,
    channel_id       bigint,
    model            text NOT NULL,
    input_tokens     bigint NOT NULL,
    output_tokens    bigint NOT NULL,
    cached_tokens    bigint NOT NULL,
    cost             numeric NOT NULL CHECK (cost >= 0 OR settled_by = 'correction'),
    billed           boolean NOT NULL,
    unbilled_reason  text CHECK (billed = (unbilled_reason IS NULL)),
    -- false when an exclusive model-group policy of that axis took the spend (billing isolation)
    counted_in_key_global   boolean NOT NULL DEFAULT true,
    counted_in_user_global  boolean NOT NULL DEFAULT true,
    counted_policy   bigint[] NOT NULL,
    counted_scope    bigint[] NOT NULL,
    counted_window   timestamptz[] NOT NULL,
    counted_amount   numeric[] NOT NULL,
    settled_at       timestamptz NOT NULL
) PARTITION BY RANGE (settled_at);
-- Catches a row no partition takes (the sweep was off for longer than the partitions made ahead);
-- quota.maintain_ledger files such rows into partitions, and quota.ledger_partitions() shows them.
CREATE TABLE quota.usage_ledger_default PARTITION OF quota.usage_ledger DEFAULT;
-- Each partition has its own indexes (quota.ledger_add_indexes), none on the partitioned table:
-- partitions made after CREATE EXTENSION are the DBA's tables, which pg_dump writes with their
-- indexes, and an index of the partitioned table would make them twice on restore.
-- quota.drift and quota.status read the ledger of the current windows. Rows arrive in
-- settled_at order, so a block range index finds them for a fraction of a b-tree's cost.
CREATE INDEX ON quota.usage_ledger_default (key_id, settled_at);
CREATE INDEX ON quota.usage_ledger_default USING brin (settled_at) WITH (autosummarize = on);

-- The request ids of the ledger's recent rows, one row per ledger row, with what a settle
-- repeated answers: the ledger's request ids are unique while they are here, and a settle,
-- refund or admit that repeats one is recognised. Kept for pg_quota.reservation_ttl plus
-- pg_quota.request_id_retention after the row's settled_at (quota.maintain_ledger forgets them
-- then), so its size follows the request rate, not the ledger's age. A trigger on the ledger
-- fills it (sql/schema/60_rollups.sql).
CREATE TABLE quota.ledger_request (
    request_id       text NOT NULL,
    settled_by       text NOT NULL,
    settled_at       timestamptz NOT NULL,  -- finds the ledger row's partition
    billed           boolean NOT NULL,
    unbilled_reason  text,
    cost             numeric NOT NULL,
    PRIMARY KEY (request_id, settled_by)
);
CREATE INDEX ON quota.ledger_request USING brin (settled_at) WITH (autosummarize = on);

-- Closed ledger partitions: a partition closes (quota.close_ledger_partition) once its range
-- has ended; what its rows gave the current windows goes into quota.ledger_checkpoint, and from
-- then on quota.drift() reads the checkpoints instead of its rows, so the partition may leave
-- the ledger (quota.archive_ledger: archived_as names where it went, NULL once dropped).
-- Partitions close in order, so the closed ones cover the ledger up to max(range_to).
CREATE TABLE quota.ledger_closed (
    range_from   timestamptz PRIMARY KEY,
    range_to     timestamptz NOT NULL,
    ledger_rows  bigint NOT NULL,
    closed_at    timestamptz NOT NULL,
    archived_at  timestamptz,
    archived_as  text
);

-- What the rows of closed partitions gave each counter's window, summed (rows settled before
-- the counter's last reset left out); only windows still current are kept. quota.clear_usage
-- clears a policy's checkpoints with its counters.
CREATE TABLE quota.ledger_checkpoint (
    policy_id     bigint NOT NULL REFERENCES quota.policy ON DELETE CASCADE,
    scope_id      bigint NOT NULL,
    window_start  timestamptz NOT NULL,  -- the counted window (rolling windows: the minute bucket)
    amount        numeric NOT NULL,
    PRIMARY KEY (policy_id, scope_id, window_start)
);

-- Daily rollups, maintained by a trigger on the ledger in the same transaction.
CREATE TABLE quota.usage_daily (
    day            date NOT NULL,
    key_id         bigint NOT NULL,
    user_id        bigint NOT NULL,
    model          text NOT NULL,
    channel_id     bigint NOT NULL DEFAULT 0,
    requests       bigint NOT NULL DEFAULT 0,
    input_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens  bigint NOT NULL DEFAULT 0,
    cached_tokens  bigint NOT NULL DEFAULT 0,
    cost           numeric NOT NULL DEFAULT 0,
    unbilled       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model, channel_id)
) WITH (fillfactor = 70);
COMMENT ON COLUMN quota.usage_daily.channel_id IS '0 when the request had no channel.';

CREATE TABLE quota.event (
    event_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('exhausted', 'recovered', 'disabled', 'resumed', 'reset',
                                             'policy_created', 'policy_changed', 'policy_deleted',
                                             'reservation_expired', 'boost_created', 'boost_changed',
                                             'boost_deleted', 'unpriced_model', 'channel_created',
                                             'channel_changed', 'channel_deleted', 'channel_grant_created',
                                             'channel_grant_changed', 'channel_grant_deleted',
                                             'threshold_crossed', 'shadow_refusal')),
    policy_id  bigint,
    key_id     bigint,
    user_id    bigint,
    detail     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ON quota.event (at);

-- pg_dump must dump the rows of extension tables: they are the product's data.
SELECT pg_catalog.pg_extension_config_dump('quota.app_user', '');
SELECT pg_catalog.pg_extension_config_dump('quota.api_key', '');
SELECT pg_catalog.pg_extension_config_dump('quota.model_price', '');
SELECT pg_catalog.pg_extension_config_dump('quota.model_alias', '');
SELECT pg_catalog.pg_extension_config_dump('quota.unpriced_model_day', '');
SELECT pg_catalog.pg_extension_config_dump('quota.channel_grant', '');
SELECT pg_catalog.pg_extension_config_dump('quota.user_group', '');
SELECT pg_catalog.pg_extension_config_dump('quota.user_group_member', '');
SELECT pg_catalog.pg_extension_config_dump('quota.model_group', '');
SELECT pg_catalog.pg_extension_config_dump('quota.model_group_member', '');
SELECT pg_catalog.pg_extension_config_dump('quota.channel', '');
SELECT pg_catalog.pg_extension_config_dump('quota.channel_model', '');
SELECT pg_catalog.pg_extension_config_dump('quota.boost', '');
SELECT pg_catalog.pg_extension_config_dump('quota.policy', '');
SELECT pg_catalog.pg_extension_config_dump('quota.counter', '');
SELECT pg_catalog.pg_extension_config_dump('quota.rolling_usage', '');
SELECT pg_catalog.pg_extension_config_dump('quota.reservation', '');
SELECT pg_catalog.pg_extension_config_dump('quota.released', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_ledger_default', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_request', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_closed', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_checkpoint', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('quota.event', '');
-- ... and the positions of their identity sequences, which marking a table does not dump: a
-- restored database must number new users, keys, policies and events after the old ones.
DO $$
DECLARE
    seq regclass;
BEGIN
    FOR seq IN
        SELECT pg_catalog.pg_get_serial_sequence(c.oid::regclass::text, a.attname)::regclass
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        WHERE c.relnamespace = 'quota'::regnamespace AND a.attidentity <> '' AND NOT a.attisdropped
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(seq, '');
    END LOOP;
END
$$;
