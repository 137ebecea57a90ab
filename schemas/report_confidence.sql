-- nsd report: confidence histogram of one label run, rows per predicted class and bin.
-- $label_run VARCHAR; $bins INTEGER equal bins over [0, 1] (confidence 1.0 in the last one).
SELECT predicted,
       least(greatest(floor(confidence * $bins::INTEGER), 0), $bins::INTEGER - 1)::INTEGER AS bin,
       count(*) AS rows
FROM pseudo_labels
WHERE label_run = $label_run::VARCHAR AND confidence IS NOT NULL AND NOT isnan(confidence)
GROUP BY ALL
ORDER BY ALL;
