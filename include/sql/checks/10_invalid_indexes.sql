-- Indexes left invalid (a failed CREATE INDEX CONCURRENTLY, or damage): queries silently stop using them.
SELECT n.nspname AS schema, c.relname AS index, t.relname AS table_name
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid OR NOT i.indisready;
