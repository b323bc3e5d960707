-- One line per table of schema quota that holds rows: its row count and a digest of its rows,
-- to show that an upgrade kept every row as it was. Columns added by upgrades since the oldest
-- frozen release (listed below as table.column) are left out of the digest, so a row reads the
-- same before and after; so are tables added since, while they are empty.
\pset tuples_only on
\pset format unaligned
SELECT format('SELECT %L || '' '' || count(*) || '' '' || coalesce(md5(string_agg(r, E''\n'' ORDER BY r COLLATE "C")), ''-'') '
              'FROM (SELECT (to_jsonb(t) - %L::text[])::text AS r FROM %I.%I t) x HAVING count(*) > 0 OR NOT %L',
              c.relname, a.added, n.nspname, c.relname, c.relname = ANY (ARRAY['notifier_cursor', 'webhook_delivery']))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT coalesce(array_agg(split_part(col, '.', 2)), '{}') AS added
    FROM unnest(ARRAY['policy.enforce', 'policy.alert_at', 'counter.alert_level', 'counter.alert_window',
                      'counter.shadow_refused_at']) col
    WHERE split_part(col, '.', 1) = c.relname) a
WHERE n.nspname = 'quota' AND c.relkind IN ('r', 'p') AND c.relispartition IS NOT TRUE
ORDER BY c.relname COLLATE "C" \gexec
