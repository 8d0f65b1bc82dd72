-- One save, of any number of documents, in one statement and so in one transaction.
--
-- p_docs is a JSON array of documents:
--   {"id": doc, "fields": [field writes, as synckit_save_writes takes them],
--    "text": null | {"base": md5 of the stored crdt the new one was merged from (null: none stored),
--                    "crdt": merged state, "content": its text, "clock": text clock},
--    "ops": [{"writer", "kind", "operation", "op", "counter"}, ...]}
-- Text is compare-and-set: if the stored crdt is no longer the one the server merged into (another
-- instance saved text meanwhile), the whole save fails with serialization_failure, nothing is
-- written, and the server reads the stored text, merges again and retries.  Text documents keep
-- the reference's shape ({"type": "text", "content", "crdt", "clock"}), beside our fields.
-- Counter, set and rich-text operations go to the delta log as the reference logs field writes.

CREATE OR REPLACE FUNCTION synckit_save(p_docs JSONB) RETURNS VOID AS $$
DECLARE
  d JSONB;
  doc VARCHAR;
  t JSONB;
BEGIN
  FOR d IN SELECT * FROM jsonb_array_elements(p_docs) LOOP
    doc := d->>'id';
    IF jsonb_array_length(d->'fields') > 0 THEN
      PERFORM synckit_save_writes(doc, d->'fields');
    END IF;
    t := d->'text';
    IF jsonb_typeof(t) = 'object' THEN
      INSERT INTO documents (id, state) VALUES (doc, jsonb_build_object('id', doc, 'fields', '{}'::JSONB))
        ON CONFLICT (id) DO NOTHING;
      IF (SELECT md5(state->>'crdt') FROM documents WHERE id = doc FOR UPDATE) IS DISTINCT FROM t->>'base' THEN
        RAISE EXCEPTION 'the stored text of % changed', doc USING ERRCODE = 'serialization_failure';
      END IF;
      UPDATE documents
        SET state = state || jsonb_build_object('type', 'text', 'content', t->'content', 'crdt', t->'crdt', 'clock', t->'clock')
        WHERE id = doc;
    END IF;
    IF jsonb_array_length(d->'ops') > 0 THEN
      INSERT INTO documents (id, state) VALUES (doc, jsonb_build_object('id', doc, 'fields', '{}'::JSONB))
        ON CONFLICT (id) DO NOTHING;
      INSERT INTO deltas (document_id, client_id, operation_type, field_path, value, clock_value)
        SELECT doc, r->>'writer', r->>'kind', left(r->>'operation', 500), r->'op', (r->>'counter')::BIGINT
        FROM jsonb_array_elements(d->'ops') r;
    END IF;
  END LOOP;
END;
$$ LANGUAGE plpgsql;
