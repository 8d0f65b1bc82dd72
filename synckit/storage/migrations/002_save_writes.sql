-- One message's field writes, saved in one round trip and one transaction.
--
-- p_writes is a JSON array of {"field": name, "value": v, "stamp": [ms, counter, writer]}.  A
-- write replaces the stored field only if its stamp is newer than the stored one (last writer
-- wins, compared as the server compares them: numbers, then the writer id by code point), so
-- instances sharing the database may save concurrent writes in any order and still agree.
-- Stamps live beside the fields in documents.state under "stamps": the reference reads only
-- "id" and "fields", and keeps no tombstones (a deleted field is absent from "fields").
-- The writer's vector-clock entry only grows; every write is logged in deltas, as the
-- reference does, deletes with a NULL value (field_path holds 500 characters of the name).

CREATE OR REPLACE FUNCTION synckit_stamp_newer(a JSONB, b JSONB) RETURNS BOOLEAN AS $$
  SELECT ((a->>0)::NUMERIC, (a->>1)::NUMERIC, (a->>2) COLLATE "C")
       > ((b->>0)::NUMERIC, (b->>1)::NUMERIC, (b->>2) COLLATE "C")
$$ LANGUAGE sql IMMUTABLE;

CREATE OR REPLACE FUNCTION synckit_save_writes(p_document VARCHAR, p_writes JSONB) RETURNS VOID AS $$
DECLARE
  w JSONB;
  name TEXT;
  deleted BOOLEAN;
  current JSONB;
  fields JSONB;
  stamps JSONB;
BEGIN
  INSERT INTO documents (id, state) VALUES (p_document, jsonb_build_object('id', p_document, 'fields', '{}'::JSONB))
    ON CONFLICT (id) DO NOTHING;
  SELECT state INTO current FROM documents WHERE id = p_document FOR UPDATE;
  fields := COALESCE(current->'fields', '{}'::JSONB);
  stamps := COALESCE(current->'stamps', '{}'::JSONB);
  FOR w IN SELECT * FROM jsonb_array_elements(p_writes) LOOP
    name := w->>'field';
    deleted := jsonb_typeof(w->'value') = 'object' AND w->'value'->'__deleted' = 'true'::JSONB;
    INSERT INTO vector_clocks (document_id, client_id, clock_value)
      VALUES (p_document, w->'stamp'->>2, (w->'stamp'->>1)::BIGINT)
      ON CONFLICT (document_id, client_id) DO UPDATE
        SET clock_value = GREATEST(vector_clocks.clock_value, EXCLUDED.clock_value), updated_at = NOW();
    INSERT INTO deltas (document_id, client_id, operation_type, field_path, value, clock_value)
      VALUES (p_document, w->'stamp'->>2, CASE WHEN deleted THEN 'delete' ELSE 'set' END, left(name, 500),
              CASE WHEN deleted THEN NULL ELSE w->'value' END, (w->'stamp'->>1)::BIGINT);
    IF stamps->name IS NULL OR synckit_stamp_newer(w->'stamp', stamps->name) THEN
      stamps := stamps || jsonb_build_object(name, w->'stamp');
      IF deleted THEN
        fields := fields - name;
      ELSE
        fields := fields || jsonb_build_object(name, w->'value');
      END IF;
    END IF;
  END LOOP;
  UPDATE documents
    SET state = current || jsonb_build_object('id', p_document, 'fields', fields, 'stamps', stamps)
    WHERE id = p_document;
END;
$$ LANGUAGE plpgsql;
