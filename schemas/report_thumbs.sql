-- nsd report: images for one thumbnail grid, at most $per_class per class of $classes, with bytes.
-- $grid picks the grid:
--   'confident'   the label run's most confident rows per predicted class
--   'least_kept'  the selection's least confident rows per class (what the threshold let in)
--   'mistakes'    the label run's most confident rows whose gold label differs (hidden labels only)
-- $label_run VARCHAR, $selection VARCHAR (NULL when unused), $classes INTEGER[], $per_class INTEGER.
WITH picked AS (
    SELECT image_id, predicted, confidence, NULL::INTEGER AS gold_label, -confidence AS rank_key
    FROM pseudo_labels
    WHERE $grid::VARCHAR = 'confident' AND label_run = $label_run::VARCHAR
    UNION ALL
    SELECT image_id, predicted, confidence, NULL::INTEGER, confidence
    FROM selections
    WHERE $grid::VARCHAR = 'least_kept' AND selection = $selection::VARCHAR
    UNION ALL
    SELECT p.image_id, p.predicted, p.confidence, i.gold_label, -p.confidence
    FROM pseudo_labels p JOIN images i USING (image_id)
    WHERE $grid::VARCHAR = 'mistakes' AND p.label_run = $label_run::VARCHAR
      AND i.gold_label IS NOT NULL AND p.predicted <> i.gold_label
),
top AS (
    SELECT * FROM picked
    WHERE list_contains($classes::INTEGER[], predicted) AND confidence IS NOT NULL AND NOT isnan(confidence)
    QUALIFY row_number() OVER (PARTITION BY predicted ORDER BY rank_key, image_id) <= $per_class::INTEGER
)
SELECT t.image_id, t.predicted, t.confidence, t.gold_label, i.bytes, i.source
FROM top t JOIN images i USING (image_id)
ORDER BY t.predicted, t.rank_key, t.image_id;
