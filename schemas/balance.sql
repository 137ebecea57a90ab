-- nsd balance: filter and balance one label run's pseudo labels into a training selection.
--
-- One SELECT with named parameters; it returns the columns of `selections` except
-- `selection` (nsd adds the name). It reads the tables `pseudo_labels` and `images` as they
-- are in scope, so pin the version yourself when you run it outside nsd (nsd shadows both
-- names with temp views `SELECT *, rowid FROM lake.<table> AT (VERSION => n)`):
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
-- The run's rows above the threshold, without their probability lists: ranking drags every
-- column through a sort, so the lists are joined back by rowid at the end. Thresholding before
-- dedup gives the same candidates, since an image keeps its most confident row.
-- Images that are labeled or test are never pseudo-labeled (no leakage, no double count).
-- An image without an `images` row is not leaking.
above AS (
    SELECT rowid AS row_id, image_id, hash(image_id) AS h, predicted, confidence
    FROM pseudo_labels
    WHERE label_run = $label_run::VARCHAR AND predicted IS NOT NULL AND confidence > $threshold::DOUBLE
      AND image_id NOT IN (SELECT image_id FROM images WHERE split IN ('labeled', 'test'))
),
-- Dedup, one row per image: the most confident; ties by predicted class, then by the row
-- written first (DuckLake's rowid, fixed for a given snapshot), so that the result never
-- depends on scan order. Rows tied on image, confidence and class are the same image labeled
-- twice alike; the rowid spares reading their probability lists. Only images whose hash is
-- shared by several rows need it (grouping by a hash is cheaper than by the id).
shared AS (
    SELECT h FROM above GROUP BY h HAVING count(*) > 1
),
best AS (
    SELECT row_id, image_id, predicted, confidence FROM above WHERE h IN (SELECT h FROM shared)
    QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY confidence DESC, predicted, row_id) = 1
),
one AS (  -- the ranking below sorts these three columns only; image_id is looked up later
    SELECT row_id, predicted, confidence FROM above WHERE h NOT IN (SELECT h FROM shared)
    UNION ALL
    SELECT row_id, predicted, confidence FROM best
),
-- Rank within each class by confidence; `first_rank` and `last_rank` are the ranks a group of equally
-- confident rows spans (ties are broken by image_id below, only where it matters).
candidates AS (
    SELECT *,
           rank() OVER w AS first_rank,
           count(*) OVER w AS last_rank,
           count(*) OVER (PARTITION BY predicted) AS n
    FROM one
    WINDOW w AS (PARTITION BY predicted ORDER BY confidence DESC)
),
k AS (
    SELECT coalesce($per_class::BIGINT,
                    (SELECT greatest(1, floor(median(n)))::BIGINT
                     FROM (SELECT any_value(n) AS n FROM candidates GROUP BY predicted))) AS k
),
-- A class's `top` rows: its K most confident when n >= K (the ones kept), else the K mod n that
-- get one copy more than the others (ties by image_id). Rows past `top` are dropped when
-- n >= K, and kept with floor(K / n) copies when n < K.
marked AS (
    SELECT c.*, k.k,
           CASE WHEN c.n >= k.k THEN k.k WHEN $duplicate::BOOLEAN THEN k.k % c.n ELSE 0 END AS top
    FROM candidates c, k
    WHERE c.n < k.k OR c.first_rank <= k.k
),
-- Only the tie group that straddles `top` needs its rows ordered by image_id.
straddling AS (
    SELECT row_id, first_rank + row_number() OVER (PARTITION BY predicted, confidence ORDER BY image_id) - 1 AS rank
    FROM marked JOIN above USING (row_id, predicted, confidence)
    WHERE first_rank <= top AND top < last_rank
),
kept AS (
    SELECT m.*, coalesce(s.rank, m.first_rank) <= m.top AS in_top
    FROM marked m LEFT JOIN straddling s USING (row_id)
    WHERE m.n < m.k OR coalesce(s.rank, m.first_rank) <= m.top
)
SELECT
    p.image_id,
    CASE
        WHEN $hard::BOOLEAN AND prob_classes IS NULL
            THEN list_transform(range(len(probs)), lambda i: CASE WHEN i = kept.predicted THEN 1.0 ELSE 0.0 END)
        WHEN $hard::BOOLEAN THEN [1.0]
        WHEN $sharpen::DOUBLE IS NOT NULL
            THEN list_transform(probs, lambda p: pow(p, 1.0 / $sharpen::DOUBLE)
                                / list_sum(list_transform(probs, lambda q: pow(q, 1.0 / $sharpen::DOUBLE))))
        ELSE probs
    END::FLOAT[] AS target,
    CASE WHEN $hard::BOOLEAN AND prob_classes IS NOT NULL THEN [kept.predicted] ELSE prob_classes END
        AS target_classes,
    kept.predicted,
    kept.confidence,
    CASE WHEN kept.n >= kept.k OR NOT $duplicate::BOOLEAN THEN 1
         ELSE kept.k // kept.n + in_top::INTEGER
    END::INTEGER AS copies,
    label_run
FROM kept JOIN pseudo_labels p ON p.rowid = kept.row_id
WHERE p.label_run = $label_run::VARCHAR AND p.confidence > $threshold::DOUBLE;
