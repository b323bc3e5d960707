-- One line per table of schema quota: its row count and a digest of its rows, to show that an
-- upgrade kept every row as it was.
\pset tuples_only on
\pset format unaligned
SELECT format('SELECT %L || '' '' || count(*) || '' '' || coalesce(md5(string_agg(t::text, E''\n'' ORDER BY t::text COLLATE "C")), ''-'') FROM %I.%I t',
              c.relname, n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'quota' AND c.relkind IN ('r', 'p') AND c.relispartition IS NOT TRUE
ORDER BY c.relname COLLATE "C" \gexec
