-- nsd export of a split (labeled, test or unlabeled): its images with their labels (NULL for
-- the unlabeled pool; its hidden gold labels are never exported), one copy each.
-- Parameters: $version (the snapshot), $split.
SELECT image_id, bytes, label AS class_id, NULL::FLOAT[] AS target, NULL::INTEGER[] AS target_classes,
       NULL::FLOAT AS confidence, 1 AS copies, NULL::VARCHAR AS label_run
FROM images AT (VERSION => $version::BIGINT)
WHERE split = $split::VARCHAR
ORDER BY image_id
