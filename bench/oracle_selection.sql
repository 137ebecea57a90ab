-- The oracle "selection" of bench/ssl_study.py: every pool image of a label run with its TRUE
-- (hidden gold) label as a one-hot target. A student trained on it bounds what any pseudo labels
-- could give at that budget. Run by nsd balance --sql (bound: $label_run).
SELECT p.image_id, [1.0]::FLOAT[] AS target, [i.gold_label]::INTEGER[] AS target_classes, i.gold_label::INTEGER AS predicted,
       1.0::FLOAT AS confidence, 1 AS copies, p.label_run
FROM pseudo_labels p JOIN images i USING (image_id)
WHERE p.label_run = $label_run::VARCHAR AND i.gold_label IS NOT NULL
