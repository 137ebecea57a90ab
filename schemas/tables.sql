-- nsd table definitions: one place for every table in the store.
-- Run by `nsd init` against the attached DuckLake catalog (`USE lake` first).
-- JSON-valued columns are VARCHAR holding JSON text (portable across catalogs).

-- Every image known to the store, labeled or not. image_id is the sha256 (hex) of the
-- encoded bytes, so the same picture ingested twice is one row.
CREATE TABLE IF NOT EXISTS images (
    image_id    VARCHAR NOT NULL,  -- sha256 hex of `bytes`
    bytes       BLOB    NOT NULL,  -- encoded image as given (PNG for array sources)
    format      VARCHAR,           -- png, jpeg, ...
    width       INTEGER,
    height      INTEGER,
    channels    INTEGER,           -- 1 grey, 3 RGB
    source      VARCHAR,           -- where it came from: path, URL or dataset[:index]
    split       VARCHAR NOT NULL,  -- labeled | unlabeled | test
    label       INTEGER,           -- class id; NULL in the unlabeled split
    gold_label  INTEGER,           -- hidden true label of images moved to unlabeled (experiments)
    ingest_run  VARCHAR            -- runs.run_id of the ingest that added it
);

-- A perceptual hash of every image (engine/dups.py): the DCT hash of imagehash.phash, 64 bits
-- as a signed BIGINT. Kept apart from `images` so that hashing the images of an older store
-- (`nsd hash`) adds rows here instead of rewriting the image bytes. Near-duplicates are pairs
-- with bit_count(xor(a.phash, b.phash)) <= a distance (schemas/near_pairs.sql).
CREATE TABLE IF NOT EXISTS image_hashes (
    image_id    VARCHAR NOT NULL,  -- images.image_id
    phash       BIGINT  NOT NULL
);

-- Class names, class_id is the integer used in images.label and everywhere else.
CREATE TABLE IF NOT EXISTS classes (
    class_id    INTEGER NOT NULL,
    name        VARCHAR NOT NULL
);

-- Inputs that could not be ingested, with why.
CREATE TABLE IF NOT EXISTS rejects (
    source      VARCHAR,
    reason      VARCHAR,
    ingest_run  VARCHAR
);

-- One row per run of a mutating command (ingest, label, balance, train, eval, loop).
CREATE TABLE IF NOT EXISTS runs (
    run_id      VARCHAR NOT NULL,  -- unique id, e.g. label-3f2a...
    kind        VARCHAR NOT NULL,  -- ingest | label | balance | train | eval | loop
    name        VARCHAR,           -- user-facing name (selection or model name)
    params      VARCHAR,           -- JSON: the parameters as given
    reads       VARCHAR,           -- JSON: {table: snapshot_id} read by the run
    row_counts  VARCHAR,           -- JSON: {table: rows written}
    started_at  TIMESTAMP,
    finished_at TIMESTAMP
);

-- Soft labels written by an unnoised teacher (`nsd label`). One label run = one snapshot.
-- probs is dense over all classes when prob_classes is NULL; with --top-k it holds the K largest
-- probabilities and prob_classes their class ids (same order).
CREATE TABLE IF NOT EXISTS pseudo_labels (
    image_id       VARCHAR NOT NULL,
    label_run      VARCHAR NOT NULL,  -- runs.run_id
    teacher        VARCHAR,           -- models.model, or the architecture for outside weights
    teacher_sha256 VARCHAR,           -- checkpoint hash
    probs          FLOAT[],
    prob_classes   INTEGER[],
    predicted      INTEGER,           -- argmax class
    confidence     FLOAT,             -- max probability
    margin         FLOAT,             -- top-1 minus top-2 probability
    entropy        FLOAT              -- of the (full) probability vector, nats
);

-- Training selections written by `nsd balance`: the pseudo-labeled half of a student's data.
-- Copies are a count; the trainer expands them.
CREATE TABLE IF NOT EXISTS selections (
    selection      VARCHAR NOT NULL,  -- name given with --name
    image_id       VARCHAR NOT NULL,
    target         FLOAT[],           -- soft (or one-hot) target, dense unless target_classes
    target_classes INTEGER[],         -- class ids of `target` when sparse (top-k), else NULL
    predicted      INTEGER,
    confidence     FLOAT,
    copies         INTEGER NOT NULL,
    label_run      VARCHAR
);

-- Trained models (`nsd train`), with what they came from and how well they do.
CREATE TABLE IF NOT EXISTS models (
    model             VARCHAR NOT NULL,  -- name given with --name
    run_id            VARCHAR,
    arch              VARCHAR,           -- timm model name
    num_classes       INTEGER,
    class_names       VARCHAR[],
    in_chans          INTEGER,
    image_size        INTEGER,
    mean              FLOAT[],
    std               FLOAT[],
    noise             VARCHAR,           -- JSON: randaugment, drop_rate, drop_path_rate
    selection         VARCHAR,           -- NULL for a teacher trained on labels only
    selection_version BIGINT,            -- snapshot the selection was read at
    images_version    BIGINT,            -- snapshot the images were read at
    teacher           VARCHAR,           -- model whose labels the selection holds
    num_params        BIGINT,
    metrics           VARCHAR,           -- JSON: training and eval metrics
    checkpoint        VARCHAR,           -- the weights: relative to the data path (checkpoints/...)
    sha256            VARCHAR,           -- of the checkpoint file
    created_at        TIMESTAMP,
    init              VARCHAR            -- JSON: pretrained weights or store model it started from
);

-- Names for snapshots (`nsd tag`).
CREATE TABLE IF NOT EXISTS tags (
    tag         VARCHAR NOT NULL,
    snapshot_id BIGINT  NOT NULL,
    created_at  TIMESTAMP
);
