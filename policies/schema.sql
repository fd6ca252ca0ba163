-- The demo domain: tutoring organizations with AI agents.
-- Shared across environments: organizations, users, agents, tool_permissions.
-- Environment-scoped (organization_id + environment): everything else.
-- Idempotent: safe to run again.

CREATE TABLE IF NOT EXISTS organizations (
    id   text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS users (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    email           text NOT NULL,
    name            text NOT NULL,
    phone           text
);
CREATE INDEX IF NOT EXISTS users_org ON users (organization_id);

CREATE TABLE IF NOT EXISTS agents (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    slug            text NOT NULL,
    name            text NOT NULL,
    description     text,
    UNIQUE (organization_id, slug)
);

CREATE TABLE IF NOT EXISTS tool_permissions (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    agent_id        text NOT NULL REFERENCES agents (id),
    tool            text NOT NULL,
    allowed         boolean NOT NULL DEFAULT false
);

CREATE TABLE IF NOT EXISTS entity_types (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    slug            text NOT NULL,
    schema          jsonb NOT NULL DEFAULT '{}',
    UNIQUE (organization_id, environment, slug)
);

CREATE TABLE IF NOT EXISTS entities (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    entity_type     text NOT NULL,
    data            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS entities_scope ON entities (organization_id, environment, entity_type);
-- Time-range reads within a tenant (guarded relations let the range reach the index).
CREATE INDEX IF NOT EXISTS entities_created ON entities (organization_id, environment, created_at);

CREATE TABLE IF NOT EXISTS entity_relations (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    from_id         text NOT NULL,
    to_id           text NOT NULL,
    relation_type   text NOT NULL
);
CREATE INDEX IF NOT EXISTS entity_relations_from ON entity_relations (from_id, relation_type);
-- Every environment-scoped table has an index leading with (organization, environment): the
-- predicates the proxy adds to every statement (`doctor` checks for it).
CREATE INDEX IF NOT EXISTS entity_relations_scope ON entity_relations (organization_id, environment, relation_type);

CREATE TABLE IF NOT EXISTS agent_configs (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    agent_id        text NOT NULL REFERENCES agents (id),
    system_prompt   text NOT NULL DEFAULT '',
    model           text NOT NULL,
    tools           jsonb NOT NULL DEFAULT '[]',
    UNIQUE (agent_id, environment)
);
CREATE INDEX IF NOT EXISTS agent_configs_scope ON agent_configs (organization_id, environment, agent_id);

CREATE TABLE IF NOT EXISTS threads (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    agent_id        text NOT NULL REFERENCES agents (id),
    user_id         text REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS threads_scope ON threads (organization_id, environment, agent_id);

CREATE TABLE IF NOT EXISTS messages (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    thread_id       text NOT NULL REFERENCES threads (id),
    role            text NOT NULL,
    content         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_thread ON messages (thread_id);
CREATE INDEX IF NOT EXISTS messages_scope ON messages (organization_id, environment, created_at);

CREATE TABLE IF NOT EXISTS trigger_runs (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    organization_id text NOT NULL REFERENCES organizations (id),
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    trigger         text NOT NULL,
    status          text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS trigger_runs_scope ON trigger_runs (organization_id, environment, started_at);
