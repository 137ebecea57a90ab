-- nsd report: reliability of one label run against the hidden gold labels of the images
-- (images.gold_label): per confidence bin, rows, mean confidence and accuracy.
-- Expected calibration error = sum over bins of rows / total * |accuracy - confidence|.
-- $label_run VARCHAR; $bins INTEGER equal bins over [0, 1].
SELECT least(greatest(floor(p.confidence * $bins::INTEGER), 0), $bins::INTEGER - 1)::INTEGER AS bin,
       count(*) AS rows,
       avg(p.confidence) AS confidence,
       avg((p.predicted = i.gold_label)::DOUBLE) AS accuracy
FROM pseudo_labels p JOIN images i USING (image_id)
WHERE p.label_run = $label_run::VARCHAR AND i.gold_label IS NOT NULL
  AND p.confidence IS NOT NULL AND NOT isnan(p.confidence)
GROUP BY bin
ORDER BY bin;
