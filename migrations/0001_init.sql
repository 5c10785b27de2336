-- Jobs, the message each stage consumed, and knowledge chunks for retrieval.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE jobs (
    job_id          text PRIMARY KEY,
    request_id      text NOT NULL,
    conversation_id text NOT NULL,
    requested_model text NOT NULL,
    status          text NOT NULL DEFAULT 'queued',  -- queued, running, finished, failed, aborted
    route           text,
    target_model    text,
    finish_reason   text,
    error           text,
    usage           jsonb NOT NULL DEFAULT '{}'::jsonb,
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
    replay_of       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX jobs_conversation_idx ON jobs (conversation_id, created_at);

-- One row per message a stage consumed; `message` is the job dict as received,
-- so replay re-sends it unchanged.
CREATE TABLE stage_runs (
    id           bigserial PRIMARY KEY,
    job_id       text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    stage        text NOT NULL,
    message      jsonb NOT NULL,
    worker       text NOT NULL,
    queued_at    timestamptz,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    duration_ms  double precision,
    outcome      text  -- the next queue, 'published', or 'error: ...'
);
CREATE INDEX stage_runs_job_idx ON stage_runs (job_id, id);

CREATE TABLE documents (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL UNIQUE,
    sha256      text NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);

-- 512 dimensions: the multilingual Universal Sentence Encoder v3.
CREATE TABLE chunks (
    id          bigserial PRIMARY KEY,
    document_id bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    heading     text,
    content     text NOT NULL,
    embedding   vector(512) NOT NULL,
    UNIQUE (document_id, chunk_index)
);
-- USE embeddings are normalised, so cosine distance ranks like inner product.
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
