-- The catalog: architectures, zoos and their work units, zoo models (with
-- optional training snapshots), denoiser versions and jobs. Times are Unix
-- milliseconds; structured values are JSON text, so the SQLite schema is the
-- same table for table.

CREATE TABLE architectures (
    name           TEXT PRIMARY KEY,
    family         TEXT NOT NULL DEFAULT '',
    spec_json      TEXT NOT NULL,
    num_parameters BIGINT NOT NULL CHECK (num_parameters > 0),
    created_at_ms  BIGINT NOT NULL
);

CREATE TABLE zoo_models (
    id                   TEXT PRIMARY KEY,
    zoo                  TEXT NOT NULL,
    architecture         TEXT NOT NULL REFERENCES architectures (name),
    family               TEXT NOT NULL DEFAULT '',
    source               TEXT NOT NULL CHECK (source IN ('built', 'ingested')),
    task_json            TEXT NOT NULL,
    seed                 BIGINT NOT NULL,
    metrics_json         TEXT NOT NULL,
    training_config_json TEXT NOT NULL,
    sha256               TEXT NOT NULL,
    size_bytes           BIGINT NOT NULL,
    created_at_ms        BIGINT NOT NULL,
    -- One file is one model of an architecture (ingestion deduplicates on it).
    UNIQUE (architecture, sha256)
);
CREATE INDEX zoo_models_by_zoo ON zoo_models (zoo, created_at_ms DESC, id DESC);
CREATE INDEX zoo_models_by_architecture ON zoo_models (architecture, created_at_ms DESC, id DESC);

-- The last checkpoints of a zoo model's training run, when kept.
CREATE TABLE zoo_model_snapshots (
    model_id   TEXT NOT NULL REFERENCES zoo_models (id) ON DELETE CASCADE,
    epoch      BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (model_id, epoch)
);

-- A zoo to build: its family, architecture and build configuration.
CREATE TABLE zoos (
    name          TEXT PRIMARY KEY,
    family        TEXT NOT NULL,
    architecture  TEXT NOT NULL REFERENCES architectures (name),
    config_json   TEXT NOT NULL,
    num_models    BIGINT NOT NULL CHECK (num_models > 0),
    created_at_ms BIGINT NOT NULL
);

-- One model to train. Workers claim pending (or stale claimed) units; a unit
-- is done exactly when its model row exists (same transaction).
CREATE TABLE zoo_units (
    zoo           TEXT NOT NULL REFERENCES zoos (name),
    unit          BIGINT NOT NULL,
    spec_json     TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'claimed', 'done')),
    worker        TEXT,
    claimed_at_ms BIGINT,
    attempts      BIGINT NOT NULL DEFAULT 0,
    model_id      TEXT REFERENCES zoo_models (id),
    PRIMARY KEY (zoo, unit)
);
CREATE INDEX zoo_units_open ON zoo_units (zoo, state, unit);

CREATE TABLE denoisers (
    id            TEXT PRIMARY KEY,
    architecture  TEXT NOT NULL REFERENCES architectures (name),
    sha256        TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    config_json   TEXT NOT NULL,
    summary_json  TEXT NOT NULL,
    active        INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    created_at_ms BIGINT NOT NULL
);
-- At most one active denoiser per architecture.
CREATE UNIQUE INDEX denoisers_one_active ON denoisers (architecture) WHERE active = 1;
CREATE INDEX denoisers_by_architecture ON denoisers (architecture, created_at_ms DESC, id DESC);

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec_json       TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    attempts        BIGINT NOT NULL DEFAULT 0,
    max_attempts    BIGINT NOT NULL DEFAULT 1,
    progress        REAL NOT NULL DEFAULT 0,
    message         TEXT NOT NULL DEFAULT '',
    error           TEXT NOT NULL DEFAULT '',
    worker          TEXT,
    denoiser_id     TEXT,
    models_built    BIGINT NOT NULL DEFAULT 0,
    -- Bumped on every update: writers compare-and-set on it.
    version         BIGINT NOT NULL DEFAULT 0,
    created_at_ms   BIGINT NOT NULL,
    started_at_ms   BIGINT,
    finished_at_ms  BIGINT,
    heartbeat_at_ms BIGINT
);
CREATE INDEX jobs_by_state ON jobs (state, created_at_ms, id);
