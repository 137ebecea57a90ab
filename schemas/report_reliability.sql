-- nsd report: reliability of one label run against the hidden gold labels of the images
-- (images.gold_label): per confidence bin, rows, mean confidence and accuracy.
-- Expected calibration error = sum over bins of rows / total * |accuracy - confidence|.
-- $label_run VARCHAR; $bins INTEGER equal bins over [0, 1].
-- $undo_temperature DOUBLE: NULL for the stored confidences; T for the teacher's own, before a
-- run labeled with softmax(z / T): softmax(z / T)^T renormalised is softmax(z) (dense rows only).
WITH rows AS (
    SELECT p.predicted, i.gold_label,
           CASE WHEN $undo_temperature::DOUBLE IS NULL THEN p.confidence
                ELSE pow(list_max(p.probs), $undo_temperature::DOUBLE)
                     / list_sum(list_transform(p.probs, x -> pow(x, $undo_temperature::DOUBLE))) END AS confidence
    FROM pseudo_labels p JOIN images i USING (image_id)
    WHERE p.label_run = $label_run::VARCHAR AND i.gold_label IS NOT NULL
      AND ($undo_temperature::DOUBLE IS NULL OR p.prob_classes IS NULL)
)
SELECT least(greatest(floor(confidence * $bins::INTEGER), 0), $bins::INTEGER - 1)::INTEGER AS bin,
       count(*) AS rows,
       avg(confidence) AS confidence,
       avg((predicted = gold_label)::DOUBLE) AS accuracy
FROM rows
WHERE confidence IS NOT NULL AND NOT isnan(confidence)
GROUP BY bin
ORDER BY bin;
