-- Databases close to transaction ID wraparound (over 1.2 billion of the 2 billion limit): the restored copy
-- inherits the primary's age, so this is a warning about the primary too.
SELECT datname, age(datfrozenxid) AS xid_age
FROM pg_database
WHERE age(datfrozenxid) > 1200000000;
