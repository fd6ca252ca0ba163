-- The runner's development database: the one managed table of tables.toml.
CREATE TABLE IF NOT EXISTS compat_managed (
    id text PRIMARY KEY,
    organization_id text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('development', 'production')),
    data jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS compat_managed_org_env ON compat_managed (organization_id, environment);
