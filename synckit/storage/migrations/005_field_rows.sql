-- A write costs what it changes: one row per field, instead of the whole documents.state.
--
-- Until 004 every save rewrote documents.state (every field and every stamp) to change one field,
-- so a write to a document of 10,000 fields cost tens of milliseconds.  From here on:
--
-- - synckit_fields holds, per document and field, the last-writer-wins stamp (ts, counter, writer)
--   and the value; a deleted field is a tombstone row, its value SQL NULL (JSON null is 'null').
--   A write upserts only its own rows, kept where its stamp is newer.  The key is the field name's
--   md5, so that names of any length fit the index, as they fit a JSONB key before.
-- - documents.state keeps the reference's shape ({"id", "fields"} and the text keys), without our
--   stamps.  It is the base a load starts from; rows written since it was last brought up to date
--   are "pending" and go over it.  synckit_sync_state folds pending rows into it in the
--   background (docs/data-lifecycle.md says how far behind it may be), so the reference reads
--   what we wrote, and what the reference writes to it stays what we read.
-- - The delta log and vector_clocks are written as before.

CREATE TABLE synckit_fields (
  document_id VARCHAR(256) NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
  field TEXT NOT NULL,
  key UUID GENERATED ALWAYS AS (md5(field)::UUID) STORED,
  value JSONB,
  ts BIGINT NOT NULL,
  counter BIGINT NOT NULL,
  writer TEXT COLLATE "C" NOT NULL,
  pending BOOLEAN NOT NULL DEFAULT TRUE,
  PRIMARY KEY (document_id, key)
);
-- What synckit_sync_state looks for, and what the cleanup collects: small, as both are rare.
CREATE INDEX synckit_fields_pending ON synckit_fields (document_id) WHERE pending;
CREATE INDEX synckit_fields_tombstones ON synckit_fields (ts) WHERE value IS NULL;

-- Existing data: every stamped field becomes a row, already in documents.state (not pending).
INSERT INTO synckit_fields (document_id, field, value, ts, counter, writer, pending)
  SELECT d.id, s.key, CASE WHEN jsonb_typeof(d.state->'fields') = 'object' THEN d.state->'fields'->s.key END,
         (s.value->>0)::NUMERIC::BIGINT, (s.value->>1)::NUMERIC::BIGINT, s.value->>2, FALSE
  FROM documents d, jsonb_each(d.state->'stamps') s
  WHERE jsonb_typeof(d.state->'stamps') = 'object' AND jsonb_typeof(s.value) = 'array' AND jsonb_array_length(s.value) = 3
  ON CONFLICT DO NOTHING;
UPDATE documents SET state = state - 'stamps' WHERE state ? 'stamps';

-- One document's field writes, as in 004 (p_writes, the rules, the clock and the log), touching
-- only the rows of the fields written.  Rows are locked in a fixed order (writers by id, fields
-- by key, and the caller sorts documents by id), so concurrent saves wait on each other instead
-- of deadlocking.

CREATE OR REPLACE FUNCTION synckit_save_writes(p_document VARCHAR, p_writes JSONB) RETURNS VOID AS $$
BEGIN
  INSERT INTO documents (id, state) VALUES (p_document, jsonb_build_object('id', p_document, 'fields', '{}'::JSONB))
    ON CONFLICT (id) DO NOTHING;

  INSERT INTO vector_clocks (document_id, client_id, clock_value)
    SELECT p_document, w->'stamp'->>2, MAX((w->'stamp'->>1)::BIGINT)
    FROM jsonb_array_elements(p_writes) w
    GROUP BY w->'stamp'->>2
    ORDER BY w->'stamp'->>2
    ON CONFLICT (document_id, client_id) DO UPDATE
      SET clock_value = GREATEST(vector_clocks.clock_value, EXCLUDED.clock_value), updated_at = NOW();

  INSERT INTO deltas (document_id, client_id, operation_type, field_path, value, clock_value)
    SELECT p_document, w->'stamp'->>2, CASE WHEN d THEN 'delete' ELSE 'set' END, left(w->>'field', 500),
           CASE WHEN d THEN NULL ELSE w->'value' END, (w->'stamp'->>1)::BIGINT
    FROM (SELECT w, jsonb_typeof(w->'value') = 'object' AND w->'value'->'__deleted' = 'true'::JSONB AS d
          FROM jsonb_array_elements(p_writes) WITH ORDINALITY AS e(w, n) ORDER BY n) writes;

  INSERT INTO synckit_fields (document_id, field, value, ts, counter, writer)
    SELECT p_document, name, CASE WHEN deleted THEN NULL ELSE value END, ts, counter, writer
    FROM (
      SELECT DISTINCT ON (md5(w->>'field')::UUID)
             w->>'field' AS name, w->'value' AS value,
             (w->'stamp'->>0)::BIGINT AS ts, (w->'stamp'->>1)::BIGINT AS counter, (w->'stamp'->>2) COLLATE "C" AS writer,
             COALESCE(jsonb_typeof(w->'value') = 'object' AND w->'value'->'__deleted' = 'true'::JSONB, FALSE) AS deleted
      FROM jsonb_array_elements(p_writes) WITH ORDINALITY AS e(w, n)
      ORDER BY md5(w->>'field')::UUID, (w->'stamp'->>0)::BIGINT DESC, (w->'stamp'->>1)::BIGINT DESC,
               (w->'stamp'->>2) COLLATE "C" DESC, n
    ) newest
    ON CONFLICT (document_id, key) DO UPDATE
      SET field = EXCLUDED.field, value = EXCLUDED.value, ts = EXCLUDED.ts, counter = EXCLUDED.counter,
          writer = EXCLUDED.writer, pending = TRUE
      WHERE (EXCLUDED.ts, EXCLUDED.counter, EXCLUDED.writer) > (synckit_fields.ts, synckit_fields.counter, synckit_fields.writer);
END;
$$ LANGUAGE plpgsql;

-- Stamps are compared as rows of columns now (the writer's column collates "C", by code point).
DROP FUNCTION synckit_stamp_newer(JSONB, JSONB);

-- Bring documents.state up to date for up to p_limit documents with pending rows; return how many.
-- Each document's row is locked first (FOR NO KEY UPDATE, which field writes do not wait on: they
-- only take its key share), so two instances never fold the same document at once; documents
-- another instance is folding, or whose text is being saved, are skipped until the next run.  Of
-- the pending rows only those no save holds are folded (SKIP LOCKED): the others stay pending for
-- the next run, and nothing here ever waits on a save, so no deadlock with one is possible.  One
-- jsonb rewrite per document, however many writes it had since the last run.

CREATE FUNCTION synckit_sync_state(p_limit INTEGER) RETURNS INTEGER AS $$
DECLARE
  docs VARCHAR[];
  synced INTEGER;
BEGIN
  SELECT array_agg(id) INTO docs FROM (
    SELECT d.id FROM documents d
    WHERE d.id IN (SELECT f.document_id FROM synckit_fields f WHERE f.pending)
    LIMIT p_limit FOR NO KEY UPDATE SKIP LOCKED
  ) locked;
  IF docs IS NULL THEN
    RETURN 0;
  END IF;
  WITH taken AS (
    SELECT f.document_id, f.key, f.field, f.value FROM synckit_fields f
    WHERE f.document_id = ANY (docs) AND f.pending
    FOR UPDATE SKIP LOCKED
  ), marked AS (
    UPDATE synckit_fields f SET pending = FALSE FROM taken t
    WHERE f.document_id = t.document_id AND f.key = t.key
  ), folded AS (
    SELECT document_id,
           COALESCE(jsonb_object_agg(field, value) FILTER (WHERE value IS NOT NULL), '{}'::JSONB) AS sets,
           COALESCE(array_agg(field) FILTER (WHERE value IS NULL), '{}'::TEXT[]) AS deletes
    FROM taken GROUP BY document_id
  )
  UPDATE documents d
    SET state = d.state || jsonb_build_object('id', d.id, 'fields',
      (CASE WHEN jsonb_typeof(d.state->'fields') = 'object' THEN d.state->'fields' ELSE '{}'::JSONB END - folded.deletes)
      || folded.sets)
    FROM folded WHERE d.id = folded.document_id;
  GET DIAGNOSTICS synced = ROW_COUNT;
  RETURN synced;
END;
$$ LANGUAGE plpgsql;

-- Retention (004's, with tombstones now rows): one batch of up to p_limit delta log rows logged
-- before p_deltas_before, and up to p_limit tombstone rows stamped before p_tombstones_before (ms).
-- Only tombstones already folded into documents.state are collected (a pending one still has to
-- remove its field there), and rows a save holds are skipped until the next run.

DROP FUNCTION synckit_cleanup(TIMESTAMP WITH TIME ZONE, BIGINT, INTEGER);

CREATE FUNCTION synckit_cleanup(p_deltas_before TIMESTAMP WITH TIME ZONE, p_tombstones_before BIGINT, p_limit INTEGER)
  RETURNS TABLE (deltas INTEGER, documents INTEGER, tombstones INTEGER) AS $$
DECLARE
  removed INTEGER;
BEGIN
  DELETE FROM deltas WHERE id IN (SELECT l.id FROM deltas l WHERE l.timestamp < p_deltas_before LIMIT p_limit);
  GET DIAGNOSTICS removed = ROW_COUNT;
  RETURN QUERY
    WITH doomed AS (
      SELECT f.document_id, f.key FROM synckit_fields f
      WHERE f.value IS NULL AND f.ts < p_tombstones_before AND NOT f.pending
      LIMIT p_limit FOR UPDATE SKIP LOCKED
    ), gone AS (
      DELETE FROM synckit_fields f USING doomed
      WHERE f.document_id = doomed.document_id AND f.key = doomed.key
      RETURNING f.document_id
    )
    SELECT removed, (SELECT COUNT(DISTINCT document_id) FROM gone)::INTEGER, (SELECT COUNT(*) FROM gone)::INTEGER;
END;
$$ LANGUAGE plpgsql;
