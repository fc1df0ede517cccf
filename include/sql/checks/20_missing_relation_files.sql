-- Every permanent table, index, materialized view and TOAST table must have its main file on disk:
-- a restore that lost a file fails here before any query touches the relation.
SELECT c.oid::regclass AS relation, pg_relation_filepath(c.oid) AS path
FROM pg_class c
WHERE c.relkind IN ('r', 'i', 'm', 't', 'S')
  AND c.relpersistence = 'p'
  AND pg_relation_filepath(c.oid) IS NOT NULL
  AND pg_stat_file(pg_relation_filepath(c.oid), true) IS NULL;
