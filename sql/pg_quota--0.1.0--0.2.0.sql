-- pg_quota 0.1.0 → 0.2.0. Every schema change after release 0.1.0 goes here as well as into
-- sql/schema/, so that ALTER EXTENSION pg_quota UPDATE gives a 0.1.0 database exactly what a
-- fresh install of 0.2.0 has, keeping its data (scripts/test-upgrade.sh proves it).
\echo Use "ALTER EXTENSION pg_quota UPDATE" to load this file. \quit
