-- nsd balance: filter and balance one label run's pseudo labels into a training selection.
--
-- One SELECT with named parameters; it returns the columns of `selections` except
-- `selection` (nsd adds the name). It reads the tables `pseudo_labels` and `images` as they
-- are in scope, so pin the version yourself when you run it outside nsd (nsd shadows both
-- names with temp views over `lake.<table> AT (VERSION => n)`):
--
--   ATTACH 'ducklake:sqlite:nsd-store/catalog.sqlite' AS lake
--       (DATA_PATH 'nsd-store/data/', SNAPSHOT_VERSION 7, READ_ONLY);
--   USE lake;
--   PREPARE balance AS <this file without its final semicolon>;
--   EXECUTE balance(label_run := 'label-...', threshold := 0.3, per_class := NULL,
--                   duplicate := true, hard := false, sharpen := NULL);
--
-- Parameters:
--   $label_run  VARCHAR  the label run to balance
--   $threshold  DOUBLE   keep rows with confidence > threshold
--   $per_class  BIGINT   K images per class; NULL = median over classes that have at least
--                        one candidate, rounded down, at least 1
--   $duplicate  BOOLEAN  duplicate classes with fewer than K candidates up to K
--   $hard       BOOLEAN  one-hot targets instead of soft ones
--   $sharpen    DOUBLE   NULL, or T: target = p^(1/T) renormalised (sparsity kept)
WITH
-- One row per image: the most confident row; ties by predicted class, then by the probs,
-- so that the result never depends on scan order.
run AS (
    SELECT image_id, label_run, probs, prob_classes, predicted, confidence
    FROM pseudo_labels
    WHERE label_run = $label_run::VARCHAR AND confidence IS NOT NULL AND predicted IS NOT NULL
    QUALIFY row_number() OVER (
        PARTITION BY image_id ORDER BY confidence DESC, predicted, probs, prob_classes) = 1
),
-- Images that are labeled or test are never pseudo-labeled (no leakage, no double count).
-- An image without an `images` row is not leaking.
clean AS (
    SELECT * FROM run
    WHERE image_id NOT IN (SELECT image_id FROM images WHERE split IN ('labeled', 'test'))
),
candidates AS (
    SELECT *,
           row_number() OVER (PARTITION BY predicted ORDER BY confidence DESC, image_id) AS rank,
           count(*) OVER (PARTITION BY predicted) AS n
    FROM clean
    WHERE confidence > $threshold::DOUBLE
),
k AS (
    SELECT coalesce($per_class::BIGINT,
                    (SELECT greatest(1, floor(median(n)))::BIGINT
                     FROM (SELECT any_value(n) AS n FROM candidates GROUP BY predicted))) AS k
),
kept AS (
    SELECT c.*,
           CASE WHEN NOT $duplicate::BOOLEAN OR c.n >= k.k THEN 1
                ELSE k.k // c.n + CASE WHEN c.rank <= k.k % c.n THEN 1 ELSE 0 END
           END AS copies
    FROM candidates c, k
    WHERE c.rank <= k.k
)
SELECT
    image_id,
    CASE
        WHEN $hard::BOOLEAN AND prob_classes IS NULL
            THEN list_transform(range(len(probs)), lambda i: CASE WHEN i = predicted THEN 1.0 ELSE 0.0 END)
        WHEN $hard::BOOLEAN THEN [1.0]
        WHEN $sharpen::DOUBLE IS NOT NULL
            THEN list_transform(probs, lambda p: pow(p, 1.0 / $sharpen::DOUBLE)
                                / list_sum(list_transform(probs, lambda q: pow(q, 1.0 / $sharpen::DOUBLE))))
        ELSE probs
    END::FLOAT[] AS target,
    CASE WHEN $hard::BOOLEAN AND prob_classes IS NOT NULL THEN [predicted] ELSE prob_classes END
        AS target_classes,
    predicted,
    confidence,
    copies::INTEGER AS copies,
    label_run
FROM kept;
