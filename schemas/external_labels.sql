-- nsd label --from: soft labels computed elsewhere (another framework, a bigger model, a GPU
-- cluster), checked row by row before they become a label run. Reads the Parquet files
-- $files (columns image_id, probs: one dense probability vector per image) and returns every
-- row with `reason` NULL when it is good, else why it is refused. Parameters: $files (list
-- of paths), $num_classes (the store's class count), $tolerance (|sum(probs) - 1| allowed).
WITH src AS (
    SELECT image_id::VARCHAR AS image_id, probs::DOUBLE[] AS probs FROM read_parquet($files)
),
checked AS (
    SELECT *, count(*) OVER (PARTITION BY image_id) AS times, list_sum(probs) AS total,
           len(list_filter(probs, lambda p: p IS NULL OR NOT isfinite(p) OR p < 0)) AS bad
    FROM src
)
SELECT image_id, probs, CASE
    WHEN image_id IS NULL THEN 'no image id'
    WHEN image_id NOT IN (SELECT image_id FROM images WHERE split = 'unlabeled')
        THEN 'not an image of the unlabeled pool'
    WHEN times > 1 THEN 'image id given more than once'
    WHEN probs IS NULL OR len(probs) <> $num_classes::INTEGER
        THEN 'probability vector of length ' || coalesce(len(probs), 0) || ', the store has '
             || $num_classes::INTEGER || ' classes'
    WHEN bad > 0 THEN 'NaN, infinite or negative probabilities'
    WHEN abs(total - 1) > $tolerance::DOUBLE THEN 'probabilities sum to ' || round(total, 6) || ', not 1'
END AS reason
FROM checked
