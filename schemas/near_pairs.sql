-- nsd dups / balance's leakage gate: near-duplicate pairs by perceptual hash.
--
-- Every pair of hashed images (image_a < image_b) whose 64-bit hashes differ in at most
-- $distance bits, with their splits. It reads `image_hashes` and `images` as they are in scope
-- (nsd pins both to one version first), so outside nsd:
--
--   ATTACH 'ducklake:sqlite:nsd-store/catalog.sqlite' AS lake (DATA_PATH 'nsd-store/data/', READ_ONLY);
--   USE lake;
--   PREPARE near_pairs AS <this file without its final semicolon>;
--   EXECUTE near_pairs(distance := 2, splits := NULL);
--
-- Parameters:
--   $distance  INTEGER    the largest Hamming distance of a pair, 0..64 (nsd allows 0..8)
--   $splits    VARCHAR[]  only images of these splits; NULL = every split
--
-- The banded join (LSH with exact recall): the 64 bits are cut into $distance + 1 bands, so
-- two hashes within $distance bits agree on at least one whole band (pigeonhole). Joining on
-- (band, bits of the band) compares only hashes that share a band, and the final filter keeps
-- exactly the pairs a comparison of all pairs would keep. At distance 2 a band is 21-22 bits:
-- a million random hashes give a few candidates each. Larger distances mean narrower bands
-- and many more candidates.
WITH
hashed AS (
    SELECT h.image_id, h.phash, i.split
    FROM image_hashes h JOIN images i USING (image_id)
    WHERE $splits::VARCHAR[] IS NULL OR list_contains($splits::VARCHAR[], i.split)
),
bands AS (  -- band b holds bits [lo, hi)
    SELECT b AS band, (b * 64) // ($distance::INTEGER + 1) AS lo, ((b + 1) * 64) // ($distance::INTEGER + 1) AS hi
    FROM range($distance::INTEGER + 1) t(b)
),
keyed AS (  -- >> is arithmetic on BIGINT; the mask keeps the band's own bits
    SELECT h.image_id, h.phash, h.split, bands.band,
           CASE WHEN hi - lo >= 64 THEN h.phash ELSE (h.phash >> lo) & ((1::BIGINT << (hi - lo)) - 1) END AS key
    FROM hashed h, bands
)
SELECT DISTINCT a.image_id AS image_a, b.image_id AS image_b, a.split AS split_a, b.split AS split_b,
       bit_count(xor(a.phash, b.phash))::INTEGER AS distance
FROM keyed a JOIN keyed b ON a.band = b.band AND a.key = b.key AND a.image_id < b.image_id
WHERE bit_count(xor(a.phash, b.phash)) <= $distance::INTEGER;
