-- nsd report: images that changed predicted class from label run $run_a to $run_b, most
-- confident (in $run_b) first, at most $limit, with their bytes for thumbnails.
SELECT f.image_id, f.class_a, f.class_b, f.confidence, i.gold_label, i.bytes, i.source
FROM (SELECT a.image_id, a.predicted AS class_a, b.predicted AS class_b, b.confidence
      FROM (SELECT image_id, predicted FROM pseudo_labels WHERE label_run = $run_a::VARCHAR) a
      JOIN (SELECT image_id, predicted, confidence FROM pseudo_labels WHERE label_run = $run_b::VARCHAR) b
        USING (image_id)
      WHERE a.predicted IS DISTINCT FROM b.predicted
      ORDER BY b.confidence DESC NULLS LAST, a.image_id
      LIMIT $limit::INTEGER) f
JOIN images i USING (image_id)
ORDER BY f.confidence DESC NULLS LAST, f.image_id;
