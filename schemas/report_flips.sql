-- nsd report: class flip matrix between two label runs over the images both labeled:
-- images per (class from $run_a, class from $run_b). Same pairing as `nsd diff pseudo_labels --runs`.
SELECT a.predicted AS class_a, b.predicted AS class_b, count(*) AS images
FROM (SELECT image_id, predicted FROM pseudo_labels WHERE label_run = $run_a::VARCHAR) a
JOIN (SELECT image_id, predicted FROM pseudo_labels WHERE label_run = $run_b::VARCHAR) b USING (image_id)
GROUP BY ALL
ORDER BY ALL;
