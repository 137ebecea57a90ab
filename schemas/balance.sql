-- nsd balance: filter and balance one label run's pseudo labels into a training selection.
--
-- One SELECT with named parameters; it returns the columns of `selections` except
-- `selection` (nsd adds the name). It reads the tables `pseudo_labels` and `images` as they
-- are in scope, so pin the version yourself when you run it outside nsd (nsd shadows both
-- names with temp views `SELECT *, rowid FROM lake.<table> AT (VERSION => n)`), and the table
-- `near_test`: the unlabeled images within --leakage-distance bits of a test image's
-- perceptual hash (nsd makes it from schemas/near_pairs.sql; empty with the gate off):
--
--   ATTACH 'ducklake:sqlite:nsd-store/catalog.sqlite' AS lake
--       (DATA_PATH 'nsd-store/data/', SNAPSHOT_VERSION 7, READ_ONLY);
--   USE lake;
--   CREATE TEMP TABLE near_test (image_id VARCHAR);  -- no leakage gate
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
-- The run's rows above the threshold, without their probability lists: a run labeled with
-- dense targets holds every class's probability in each row, too much to keep for every
-- candidate; the final step reads the lists as it writes. Thresholding before dedup gives the
-- same candidates, since an image keeps its most confident row. Images that are labeled or
-- test are never pseudo-labeled (no leakage, no double count), nor are near-copies of a test
-- image (`near_test`); an image without an `images` row is not leaking. `bucket`: one of
-- 128 confidence buckets, in the order of confidence
-- (a NaN or infinite confidence, which would pass any threshold in DuckDB, is never kept).
above AS (
    SELECT rowid AS row_id, image_id, hash(image_id) AS h, predicted, confidence,
           CASE WHEN confidence >= 1 THEN 127 WHEN confidence > 0 THEN floor(confidence * 128)
                ELSE 0 END::INTEGER AS bucket,
           image_id IN (SELECT image_id FROM images WHERE split IN ('labeled', 'test', 'val')
                        UNION ALL SELECT image_id FROM near_test) AS leaked
    FROM pseudo_labels
    WHERE label_run = $label_run::VARCHAR AND predicted IS NOT NULL AND image_id IS NOT NULL
      AND confidence > $threshold::DOUBLE AND isfinite(confidence)
),
-- Dedup, one row per image: the most confident; ties by predicted class, then by the row
-- written first (DuckLake's rowid, fixed for a given snapshot), so that the result never
-- depends on scan order. Only images whose hash is shared by several rows need it; they are
-- found by sorting the hashes (a third of the CPU of a GROUP BY over millions of distinct
-- hashes). `losers` are the other rows of those images.
shared AS (
    SELECT DISTINCT h FROM (SELECT h, lag(h) OVER (ORDER BY h) AS previous FROM above WHERE NOT leaked)
    WHERE h = previous
),
losers AS (
    SELECT row_id, predicted, bucket FROM above WHERE NOT leaked AND h IN (SELECT h FROM shared)
    QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY confidence DESC, predicted, row_id) > 1
),
-- The candidates of each class counted per confidence bucket: n, K, and which rows are a
-- class's `top` follow from these counts and an exact ranking of ONE bucket per class.
-- Counted as all rows minus the few losers (cheaper than leaving losers out of every row).
hist AS (
    SELECT predicted, bucket, sum(c) AS c
    FROM (SELECT predicted, bucket, count(*) AS c FROM above WHERE NOT leaked GROUP BY ALL
          UNION ALL
          SELECT predicted, bucket, -count(*) FROM losers GROUP BY ALL)
    GROUP BY ALL HAVING sum(c) > 0
),
sizes AS (  -- n per class
    SELECT predicted, sum(c)::BIGINT AS n FROM hist GROUP BY predicted
),
k AS (
    SELECT coalesce($per_class::BIGINT, (SELECT greatest(1, floor(median(n)))::BIGINT FROM sizes)) AS k
),
cumulative AS (
    SELECT *, sum(c) OVER (PARTITION BY predicted ORDER BY bucket DESC) AS at_or_above FROM hist
),
-- A class's `top` rows: its K most confident when n >= K (the ones kept), else the K mod n that
-- get one copy more than the others; ties by image_id. Rows past `top` are dropped when
-- n >= K, and kept with floor(K / n) copies when n < K. `cut` is the bucket holding the
-- class's top-th row (128: none), `higher` the number of rows in the buckets above it.
classes AS (
    SELECT predicted, n, k.k,
           CASE WHEN n >= k.k THEN k.k WHEN $duplicate::BOOLEAN THEN k.k % n ELSE 0 END AS top
    FROM sizes, k
),
cuts AS (
    SELECT cl.predicted, cl.n, cl.k, cl.top,
           coalesce(max(cu.bucket) FILTER (WHERE cu.at_or_above >= cl.top AND cl.top > 0), 128) AS cut,
           coalesce(arg_max(cu.at_or_above - cu.c, cu.bucket)
                    FILTER (WHERE cu.at_or_above >= cl.top AND cl.top > 0), 0) AS higher
    FROM classes cl JOIN cumulative cu USING (predicted)
    GROUP BY ALL
),
-- The exact class rank of the rows in a class's cut bucket (most confident first, ties by
-- image_id): every more confident row of the class is in that bucket or a higher one.
boundary AS (
    SELECT a.row_id,
           c.higher + row_number() OVER (PARTITION BY a.predicted ORDER BY a.confidence DESC, a.image_id) AS rank
    FROM above a JOIN cuts c ON a.predicted = c.predicted AND a.bucket = c.cut
    WHERE NOT a.leaked AND a.row_id NOT IN (SELECT row_id FROM losers)
),
kept AS (
    SELECT p.*, c.n, c.k,
           p.bucket > c.cut OR (p.bucket = c.cut AND coalesce(b.rank <= c.top, false)) AS in_top
    FROM (SELECT *, rowid AS row_id, CASE WHEN confidence >= 1 THEN 127 WHEN confidence > 0 THEN floor(confidence * 128)
                         ELSE 0 END::INTEGER AS bucket
          FROM pseudo_labels
          WHERE label_run = $label_run::VARCHAR AND predicted IS NOT NULL AND image_id IS NOT NULL
            AND confidence > $threshold::DOUBLE AND isfinite(confidence)) p
    -- rows below a capped class's cut bucket are never kept: left out before the joins below
    JOIN cuts c ON p.predicted = c.predicted AND (c.n < c.k OR p.bucket >= c.cut)
    LEFT JOIN boundary b ON b.row_id = p.row_id
    WHERE p.row_id NOT IN (SELECT row_id FROM above WHERE leaked UNION ALL SELECT row_id FROM losers)
)
SELECT
    image_id,
    CASE
        WHEN $hard::BOOLEAN AND prob_classes IS NULL
            THEN list_transform(range(len(probs)), lambda i: CASE WHEN i = predicted THEN 1.0 ELSE 0.0 END)
        WHEN $hard::BOOLEAN THEN [1.0]
        WHEN $sharpen::DOUBLE IS NOT NULL
            -- (p / max p)^(1/T): the largest term is 1, so the sum never underflows to 0
            THEN list_transform(probs, lambda p: pow(p / list_max(probs), 1.0 / $sharpen::DOUBLE)
                                / list_sum(list_transform(probs, lambda q: pow(q / list_max(probs), 1.0 / $sharpen::DOUBLE))))
        ELSE probs
    END::FLOAT[] AS target,
    CASE WHEN $hard::BOOLEAN AND prob_classes IS NOT NULL THEN [predicted] ELSE prob_classes END
        AS target_classes,
    predicted,
    confidence,
    CASE WHEN n >= k OR NOT $duplicate::BOOLEAN THEN 1 ELSE k // n + in_top::INTEGER END::INTEGER AS copies,
    label_run
FROM kept
WHERE n < k OR in_top;
