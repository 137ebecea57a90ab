-- nsd ingest: the fate of every staged image, decided from ids and labels only (no bytes).
--
-- One SELECT with named parameters, run inside ingest's one transaction as
-- `CREATE TEMP TABLE ingest_plan AS <this file>`; the images chosen are then inserted by
-- joining the staged file back on `ord`. It reads:
--
--   read_parquet($staged)  the staged images: ord (position in the source stream), image_id
--                          (sha256 of the bytes), role (split before --labeled-per-class),
--                          label (the source's label index); see STAGE_SCHEMA in engine/ingest.py
--   label_map              (label INTEGER, class_id INTEGER): source label -> store class id
--   images                 the store's images, to skip those it has already
--
-- Parameters:
--   $staged             VARCHAR  path of the staged Parquet file
--   $seed               VARCHAR  --seed, as text: picks the labeled subset
--   $labeled_per_class  INTEGER  keep this many labeled images per class, the rest become
--                                unlabeled; NULL keeps every labeled image labeled
--
-- Returns one row per distinct image of the source: ord, image_id, class_id, split (where it
-- goes), role (where the source put it) and new (the store does not have it yet).
WITH
-- Dedup within the source: the first copy of an image wins.
uniq AS (
    SELECT ord, image_id, role, label FROM read_parquet($staged::VARCHAR)
    QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY ord) = 1
),
-- A seeded shuffle per split and class: the labeled subset is the first N of it, the same
-- for the same seed and images whatever their order in the source.
ranked AS (
    SELECT u.ord, u.image_id, u.role, m.class_id,
           row_number() OVER (PARTITION BY u.role, m.class_id
                              ORDER BY md5($seed::VARCHAR || ':' || u.image_id)) AS rk
    FROM uniq u LEFT JOIN label_map m USING (label)
),
planned AS (
    SELECT ord, image_id, class_id,
           CASE WHEN role = 'labeled' AND $labeled_per_class IS NOT NULL
                     AND rk > $labeled_per_class THEN 'unlabeled'
                ELSE role END AS split,
           role
    FROM ranked
)
-- Dedup against the store: an image it already has (in any split) is not added again.
SELECT p.*, (i.image_id IS NULL) AS new
FROM planned p LEFT JOIN (SELECT DISTINCT image_id FROM images) i USING (image_id);
