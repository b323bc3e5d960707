-- A description of everything pg_quota defines in a database, one sorted line per property,
-- so that two databases compare with diff: a fresh install of the new version against an old
-- release upgraded by ALTER EXTENSION UPDATE. (pg_dump --schema-only would not do: it writes
-- an extension's objects as one CREATE EXTENSION line.) OIDs and names of generated objects
-- that differ between databases never appear.
\pset tuples_only on
\pset format unaligned
WITH ext AS (SELECT oid, extversion, extconfig FROM pg_extension WHERE extname = 'pg_quota'),
nsp AS (SELECT oid FROM pg_namespace WHERE nspname = 'quota'),
-- (the ledger's partitions that quota.maintain_ledger makes are the DBA's tables, not the
-- extension's: their number depends on the dates of the rows, so they and their indexes are left out)
parts AS (SELECT i.inhrelid AS oid FROM pg_inherits i
          WHERE i.inhparent = 'quota.usage_ledger'::regclass AND i.inhrelid <> 'quota.usage_ledger_default'::regclass),
rel AS (SELECT c.* FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM nsp)
          AND c.oid NOT IN (SELECT oid FROM parts)
          AND c.oid NOT IN (SELECT x.indexrelid FROM pg_index x WHERE x.indrelid IN (SELECT oid FROM parts))),
lines(line) AS (
    SELECT 'extension version ' || extversion FROM ext
    UNION ALL
    SELECT 'config table ' || cfg::regclass::text FROM ext, unnest(extconfig) cfg
    UNION ALL
    SELECT 'schema acl ' || coalesce(nspacl::text, '') || ' comment ' || coalesce(obj_description(oid, 'pg_namespace'), '')
    FROM pg_namespace WHERE oid = (SELECT oid FROM nsp)
    UNION ALL
    SELECT format('relation %s kind %s persistence %s options %s acl %s partkey %s comment %s',
                  relname, relkind, relpersistence, reloptions, relacl,
                  CASE WHEN relkind = 'p' THEN pg_get_partkeydef(oid) END, obj_description(oid, 'pg_class'))
    FROM rel
    UNION ALL
    SELECT format('column %s.%s #%s %s notnull %s default %s identity %s generated %s acl %s comment %s',
                  r.relname, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attacl,
                  col_description(r.oid, a.attnum))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = r.oid AND d.adnum = a.attnum
    UNION ALL
    SELECT format('constraint %s on %s: %s', conname, conrelid::regclass, pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace = (SELECT oid FROM nsp) AND conrelid NOT IN (SELECT oid FROM parts)
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid IN (SELECT oid FROM rel)
    UNION ALL
    SELECT format('trigger %s enabled %s', pg_get_triggerdef(t.oid), t.tgenabled)
    FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM rel) AND NOT t.tgisinternal
    UNION ALL
    SELECT format('view %s: %s', relname, pg_get_viewdef(oid)) FROM rel WHERE relkind IN ('v', 'm')
    UNION ALL
    SELECT format('sequence %s: %s %s %s %s %s', s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart,
                  s.seqincrement, s.seqmin, s.seqcycle)
    FROM pg_sequence s WHERE s.seqrelid IN (SELECT oid FROM rel)
    UNION ALL
    SELECT format('function %s acl %s comment %s: %s', p.oid::regprocedure, p.proacl,
                  obj_description(p.oid, 'pg_proc'),
                  CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid) ELSE p.prokind::text END)
    FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM nsp)
    UNION ALL
    SELECT format('type %s kind %s acl %s labels %s', t.oid::regtype, t.typtype, t.typacl,
                  (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = t.oid))
    FROM pg_type t WHERE t.typnamespace = (SELECT oid FROM nsp) AND t.typtype IN ('e', 'd', 'c', 'b', 'r')
      AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
      AND NOT EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND e.typrelid IN (SELECT oid FROM parts))
    UNION ALL
    SELECT format('policy %s on %s: %s %s %s %s', polname, polrelid::regclass, polcmd, polroles::regrole[],
                  pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
    FROM pg_policy WHERE polrelid IN (SELECT oid FROM rel)
    UNION ALL
    SELECT format('event trigger %s on %s: %s', evtname, evtevent, evtfoid::regproc)
    FROM pg_event_trigger e WHERE EXISTS (SELECT 1 FROM pg_depend d, ext WHERE d.objid = e.oid AND d.refobjid = ext.oid)
    UNION ALL
    SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
    FROM pg_depend d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
)
SELECT line FROM lines ORDER BY line COLLATE "C";
