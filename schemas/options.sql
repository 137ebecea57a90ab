-- Storage options of a new store, set by `nsd init` right after the tables exist (DuckLake
-- refuses table-scoped options on tables created in the same transaction). Options are
-- catalog metadata: setting them adds no snapshot.
--
-- Readers decompress a Parquet row group at a time: small groups keep training workers and
-- labeling at a few MiB of image bytes each, whatever the size of the pool. Only `images` has
-- big rows; the other tables keep DuckDB's default groups (122,880 rows), which scan faster.
CALL lake.set_option('parquet_row_group_size', 8192, table_name => 'images');
