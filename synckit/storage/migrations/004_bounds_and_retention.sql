-- Document ids as long as the protocol allows, saves linear in their writes, and the cleanup
-- that keeps the delta log and the tombstones from growing forever (docs/data-lifecycle.md).
--
-- 1. Ids.  The protocol allows 256-character document ids and the reference schema's columns
-- hold 255.  Widening a VARCHAR rewrites nothing, and the reference reads VARCHAR(256) as it
-- reads VARCHAR(255).  The view the reference defines over documents.id is dropped and made again
-- as it was, since PostgreSQL will not change the type of a column a view uses.

DROP VIEW IF EXISTS documents_with_clocks;
ALTER TABLE documents ALTER COLUMN id TYPE VARCHAR(256);
ALTER TABLE vector_clocks ALTER COLUMN document_id TYPE VARCHAR(256);
ALTER TABLE deltas ALTER COLUMN document_id TYPE VARCHAR(256);
ALTER TABLE snapshots ALTER COLUMN document_id TYPE VARCHAR(256);
CREATE VIEW documents_with_clocks AS
SELECT d.id, d.state, d.version, d.created_at, d.updated_at,
       json_object_agg(vc.client_id, vc.clock_value) FILTER (WHERE vc.client_id IS NOT NULL) AS vector_clock
FROM documents d
LEFT JOIN vector_clocks vc ON d.id = vc.document_id
GROUP BY d.id, d.state, d.version, d.created_at, d.updated_at;

-- 2. Saving.  Migration 002 looped over the writes and grew the fields and stamps objects by one
-- key per write, copying each object every time: quadratic (30,000 writes ran 138 s).  Here each
-- table and each object is written once per save, from set-based statements: one clock upsert
-- per writer, one delta row per write, and for each field only the write with the newest stamp
-- (of equal stamps the first, as the loop kept it), kept if newer than the stored stamp.  The
-- fields object is rebuilt once, by a hash join of the stored fields with the winning writes.
-- p_writes and the rules are as in 002.

CREATE OR REPLACE FUNCTION synckit_save_writes(p_document VARCHAR, p_writes JSONB) RETURNS VOID AS $$
DECLARE
  current JSONB;
  fields JSONB;
  stamps JSONB;
  won_stamps JSONB;
BEGIN
  INSERT INTO documents (id, state) VALUES (p_document, jsonb_build_object('id', p_document, 'fields', '{}'::JSONB))
    ON CONFLICT (id) DO NOTHING;
  SELECT state INTO current FROM documents WHERE id = p_document FOR UPDATE;
  fields := COALESCE(current->'fields', '{}'::JSONB);
  stamps := COALESCE(current->'stamps', '{}'::JSONB);

  INSERT INTO vector_clocks (document_id, client_id, clock_value)
    SELECT p_document, w->'stamp'->>2, MAX((w->'stamp'->>1)::BIGINT)
    FROM jsonb_array_elements(p_writes) w
    GROUP BY w->'stamp'->>2
    ON CONFLICT (document_id, client_id) DO UPDATE
      SET clock_value = GREATEST(vector_clocks.clock_value, EXCLUDED.clock_value), updated_at = NOW();

  INSERT INTO deltas (document_id, client_id, operation_type, field_path, value, clock_value)
    SELECT p_document, w->'stamp'->>2, CASE WHEN d THEN 'delete' ELSE 'set' END, left(w->>'field', 500),
           CASE WHEN d THEN NULL ELSE w->'value' END, (w->'stamp'->>1)::BIGINT
    FROM (SELECT w, jsonb_typeof(w->'value') = 'object' AND w->'value'->'__deleted' = 'true'::JSONB AS d
          FROM jsonb_array_elements(p_writes) WITH ORDINALITY AS e(w, n) ORDER BY n) writes;

  WITH newest AS (
    SELECT DISTINCT ON (w->>'field') w->>'field' AS name, w->'value' AS value, w->'stamp' AS stamp
    FROM jsonb_array_elements(p_writes) WITH ORDINALITY AS e(w, n)
    ORDER BY w->>'field', (w->'stamp'->>0)::NUMERIC DESC, (w->'stamp'->>1)::NUMERIC DESC,
             (w->'stamp'->>2) COLLATE "C" DESC, n
  ), won AS (
    SELECT name, value, stamp, COALESCE(jsonb_typeof(value) = 'object' AND value->'__deleted' = 'true'::JSONB, FALSE) AS deleted
    FROM newest WHERE stamps->name IS NULL OR synckit_stamp_newer(stamp, stamps->name)
  )
  SELECT (SELECT COALESCE(jsonb_object_agg(name, stamp), '{}'::JSONB) FROM won),
         (SELECT COALESCE(jsonb_object_agg(k, v), '{}'::JSONB) FROM (
            SELECT f.key AS k, f.value AS v FROM jsonb_each(fields) f
              WHERE NOT EXISTS (SELECT 1 FROM won WHERE won.name = f.key)
            UNION ALL
            SELECT name, value FROM won WHERE NOT deleted) kept)
    INTO won_stamps, fields;
  stamps := stamps || won_stamps;
  UPDATE documents
    SET state = current || jsonb_build_object('id', p_document, 'fields', fields, 'stamps', stamps)
    WHERE id = p_document;
END;
$$ LANGUAGE plpgsql;

-- 3. Retention.  One batch of the cleanup: up to p_limit delta rows logged before p_deltas_before,
-- and the tombstones (stamps of fields no longer in "fields") older than p_tombstones_before (ms,
-- the stamps' own clock) of up to p_limit documents.  The caller repeats it while a batch comes
-- back full, so that no transaction holds many rows' locks for long; documents another
-- transaction is saving are skipped until the next run.

CREATE OR REPLACE FUNCTION synckit_cleanup(p_deltas_before TIMESTAMP WITH TIME ZONE, p_tombstones_before BIGINT, p_limit INTEGER)
  RETURNS TABLE (deltas INTEGER, documents INTEGER) AS $$
DECLARE
  removed INTEGER;
  cleaned INTEGER;
BEGIN
  DELETE FROM deltas WHERE id IN (SELECT l.id FROM deltas l WHERE l.timestamp < p_deltas_before LIMIT p_limit);
  GET DIAGNOSTICS removed = ROW_COUNT;
  WITH doomed AS (
    SELECT d.id FROM documents d
    WHERE jsonb_typeof(d.state->'stamps') = 'object'
      AND EXISTS (SELECT 1 FROM jsonb_each(d.state->'stamps') s
                  WHERE NOT COALESCE(d.state->'fields' ? s.key, FALSE) AND (s.value->>0)::NUMERIC < p_tombstones_before)
    LIMIT p_limit FOR UPDATE SKIP LOCKED
  )
  UPDATE documents d
    SET state = d.state || jsonb_build_object('stamps', (
      SELECT COALESCE(jsonb_object_agg(s.key, s.value), '{}'::JSONB) FROM jsonb_each(d.state->'stamps') s
      WHERE COALESCE(d.state->'fields' ? s.key, FALSE) OR (s.value->>0)::NUMERIC >= p_tombstones_before))
    FROM doomed WHERE d.id = doomed.id;
  GET DIAGNOSTICS cleaned = ROW_COUNT;
  RETURN QUERY SELECT removed, cleaned;
END;
$$ LANGUAGE plpgsql;
