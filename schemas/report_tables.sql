-- nsd report: size of every table at the pinned snapshot: rows, and DuckLake's data files and bytes.
WITH counts AS (
    SELECT 'images' AS table_name, count(*) AS rows FROM images
    UNION ALL SELECT 'classes', count(*) FROM classes
    UNION ALL SELECT 'rejects', count(*) FROM rejects
    UNION ALL SELECT 'runs', count(*) FROM runs
    UNION ALL SELECT 'pseudo_labels', count(*) FROM pseudo_labels
    UNION ALL SELECT 'selections', count(*) FROM selections
    UNION ALL SELECT 'models', count(*) FROM models
    UNION ALL SELECT 'tags', count(*) FROM tags
)
SELECT c.table_name, c.rows, coalesce(f.file_count, 0) AS files, coalesce(f.file_size_bytes, 0) AS bytes
FROM counts c LEFT JOIN ducklake_table_info('lake') f USING (table_name)
ORDER BY c.table_name;
