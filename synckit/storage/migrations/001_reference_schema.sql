-- The reference server's schema, so that a database written by either
-- server is readable by the other.  Every statement is idempotent: on a database the reference
-- already created, this changes nothing.  Ids default to gen_random_uuid() (built in since
-- PostgreSQL 13) rather than uuid-ossp's uuid_generate_v4(), which needs CREATE EXTENSION.

CREATE TABLE IF NOT EXISTS documents (
  id VARCHAR(255) PRIMARY KEY,
  state JSONB NOT NULL DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  version BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS idx_documents_updated_at ON documents (updated_at DESC);

CREATE TABLE IF NOT EXISTS vector_clocks (
  document_id VARCHAR(255) NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
  client_id VARCHAR(255) NOT NULL,
  clock_value BIGINT NOT NULL,
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  PRIMARY KEY (document_id, client_id)
);
CREATE INDEX IF NOT EXISTS idx_vector_clocks_document_id ON vector_clocks (document_id);
CREATE INDEX IF NOT EXISTS idx_vector_clocks_updated_at ON vector_clocks (updated_at DESC);

-- An audit log of every field write; no server reads it.
CREATE TABLE IF NOT EXISTS deltas (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  document_id VARCHAR(255) NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
  client_id VARCHAR(255) NOT NULL,
  operation_type VARCHAR(50) NOT NULL,
  field_path VARCHAR(500) NOT NULL,
  value JSONB,
  clock_value BIGINT NOT NULL,
  timestamp TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_deltas_document_id ON deltas (document_id, timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_deltas_timestamp ON deltas (timestamp DESC);

-- Kept for the reference's schema; neither server writes it.
CREATE TABLE IF NOT EXISTS sessions (
  id VARCHAR(255) PRIMARY KEY,
  user_id VARCHAR(255) NOT NULL,
  client_id VARCHAR(255),
  connected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  last_seen TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  metadata JSONB DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS idx_sessions_user_id ON sessions (user_id);
CREATE INDEX IF NOT EXISTS idx_sessions_last_seen ON sessions (last_seen DESC);

CREATE TABLE IF NOT EXISTS snapshots (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  document_id VARCHAR(255) NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
  state JSONB NOT NULL,
  version JSONB NOT NULL,
  size_bytes INTEGER NOT NULL,
  compressed BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_snapshots_document_id ON snapshots (document_id, created_at DESC);
CREATE INDEX IF NOT EXISTS idx_snapshots_created_at ON snapshots (created_at DESC);

-- The same function and trigger names as the reference, so either schema file can run again
-- over the other's.
CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS TRIGGER AS $$
BEGIN
  NEW.updated_at = NOW();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS update_documents_updated_at ON documents;
CREATE TRIGGER update_documents_updated_at BEFORE UPDATE ON documents
  FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

CREATE OR REPLACE FUNCTION increment_document_version() RETURNS TRIGGER AS $$
BEGIN
  NEW.version = OLD.version + 1;
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS increment_documents_version ON documents;
CREATE TRIGGER increment_documents_version BEFORE UPDATE ON documents
  FOR EACH ROW EXECUTE FUNCTION increment_document_version();

CREATE OR REPLACE VIEW documents_with_clocks AS
SELECT d.id, d.state, d.version, d.created_at, d.updated_at,
       json_object_agg(vc.client_id, vc.clock_value) FILTER (WHERE vc.client_id IS NOT NULL) AS vector_clock
FROM documents d
LEFT JOIN vector_clocks vc ON d.id = vc.document_id
GROUP BY d.id, d.state, d.version, d.created_at, d.updated_at;

CREATE OR REPLACE FUNCTION cleanup_old_sessions() RETURNS INTEGER AS $$
DECLARE
  deleted_count INTEGER;
BEGIN
  DELETE FROM sessions WHERE last_seen < NOW() - INTERVAL '24 hours';
  GET DIAGNOSTICS deleted_count = ROW_COUNT;
  RETURN deleted_count;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION cleanup_old_deltas() RETURNS INTEGER AS $$
DECLARE
  deleted_count INTEGER;
BEGIN
  DELETE FROM deltas WHERE timestamp < NOW() - INTERVAL '30 days';
  GET DIAGNOSTICS deleted_count = ROW_COUNT;
  RETURN deleted_count;
END;
$$ LANGUAGE plpgsql;
