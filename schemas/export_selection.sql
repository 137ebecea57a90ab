-- nsd export of a selection: its rows joined to their images, one row per selected image (the
-- copies as a count; the exporter writes each copy where a format needs files).
-- Parameters: $version (the snapshot of both tables), $selection (its name).
SELECT s.image_id, i.bytes, s.predicted AS class_id, s.target, s.target_classes, s.confidence,
       s.copies, s.label_run
FROM (SELECT * FROM selections AT (VERSION => $version::BIGINT)) s
JOIN (SELECT * FROM images AT (VERSION => $version::BIGINT)) i USING (image_id)
WHERE s.selection = $selection::VARCHAR AND s.copies > 0
ORDER BY s.image_id
