-- One row per iteration of a Noisy Student loop (`nsd loop`), newest row of each model.
-- $prefix is '<loop name>-m': the loop's models are <prefix>0 (teacher), <prefix>1, ...
-- $baseline is '<loop name>-baseline': the compute-matched supervised baseline, last, with
-- iteration NULL. steps: the optimiser steps each model trained for.
-- Pseudo-label accuracy compares the label run behind each selection with the gold labels
-- hidden in the unlabeled split (NULL when the store has none): over the whole labeled pool
-- (pseudo_label_acc) and over the images the selection kept (selected_acc).
WITH m AS (
    SELECT model, arch, num_params, selection, teacher, metrics,
           CASE WHEN model <> $baseline THEN CAST(substr(model, length($prefix) + 1) AS INTEGER) END AS iteration
    FROM models
    WHERE (starts_with(model, $prefix) AND regexp_full_match(substr(model, length($prefix) + 1), '[0-9]+'))
       OR model = $baseline
    QUALIFY row_number() OVER (PARTITION BY model ORDER BY created_at DESC) = 1
),
sel AS (
    SELECT s.selection, any_value(s.label_run) AS label_run, count(*) AS images,
           sum(s.copies) AS copies,
           avg(CASE WHEN i.gold_label IS NOT NULL THEN (s.predicted = i.gold_label)::DOUBLE END) AS selected_acc
    FROM selections s LEFT JOIN images i USING (image_id)
    WHERE s.selection IN (SELECT selection FROM m)
    GROUP BY s.selection
),
pl AS (
    SELECT p.label_run, avg((p.predicted = i.gold_label)::DOUBLE) AS acc
    FROM pseudo_labels p JOIN images i USING (image_id)
    WHERE p.label_run IN (SELECT label_run FROM sel) AND i.gold_label IS NOT NULL
    GROUP BY p.label_run
)
SELECT m.iteration, m.model, m.arch, m.num_params AS params, m.teacher, m.selection,
       sel.images AS selection_images, sel.copies AS selection_size,
       pl.acc AS pseudo_label_acc, sel.selected_acc,
       CAST(json_extract(m.metrics, '$.epochs[#-1].steps') AS BIGINT) AS steps,
       CAST(json_extract(m.metrics, '$.eval.test.top1') AS DOUBLE) AS test_acc
FROM m
LEFT JOIN sel USING (selection)
LEFT JOIN pl ON pl.label_run = sel.label_run
ORDER BY m.iteration NULLS LAST
