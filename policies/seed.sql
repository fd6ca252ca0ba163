-- Seed data for the demo domain: two organizations (acme, globex), both environments, enough rows
-- to make every rule of the example policies visible. Idempotent (fixed ids, ON CONFLICT DO NOTHING).

INSERT INTO organizations (id, name) VALUES ('acme', 'Acme Tutoring'), ('globex', 'Globex Learning')
ON CONFLICT DO NOTHING;

INSERT INTO users (id, organization_id, email, name, phone) VALUES
    ('acme-teacher-1', 'acme', 'ada@acme.test', 'Ada Teacher', '+1-555-0101'),
    ('acme-teacher-2', 'acme', 'bob@acme.test', 'Bob Teacher', '+1-555-0102'),
    ('acme-guardian-1', 'acme', 'gail@acme.test', 'Gail Guardian', '+1-555-0103'),
    ('globex-teacher-1', 'globex', 'gus@globex.test', 'Gus Teacher', '+1-555-0201'),
    ('globex-guardian-1', 'globex', 'gwen@globex.test', 'Gwen Guardian', '+1-555-0202')
ON CONFLICT DO NOTHING;

INSERT INTO agents (id, organization_id, slug, name, description) VALUES
    ('acme-agent-1', 'acme', 'scheduler', 'Scheduler', 'Books tutoring sessions'),
    ('acme-agent-2', 'acme', 'billing', 'Billing', 'Answers payment questions'),
    ('globex-agent-1', 'globex', 'scheduler', 'Scheduler', 'Books tutoring sessions')
ON CONFLICT DO NOTHING;

INSERT INTO tool_permissions (id, organization_id, agent_id, tool, allowed) VALUES
    ('tp-1', 'acme', 'acme-agent-1', 'calendar', true),
    ('tp-2', 'globex', 'globex-agent-1', 'calendar', true)
ON CONFLICT DO NOTHING;

INSERT INTO entity_types (id, organization_id, environment, slug, schema)
SELECT o || '-' || e || '-' || t, o, e, t, '{}'::jsonb
FROM unnest(ARRAY['acme', 'globex']) AS o, unnest(ARRAY['development', 'production']) AS e,
     unnest(ARRAY['session', 'student']) AS t
ON CONFLICT DO NOTHING;

-- Students and sessions in every organization and environment. Every value names where it lives,
-- so a leak in a test shows exactly what leaked.
INSERT INTO entities (id, organization_id, environment, entity_type, data)
SELECT o || '-' || e || '-student-' || n, o, e, 'student',
       jsonb_build_object('name', 'Student ' || n || ' of ' || o || '/' || e, 'grade', 5 + n,
                          'guardianPhone', 'GUARDIAN-PHONE-' || o || '-' || e || '-' || n)
FROM unnest(ARRAY['acme', 'globex']) AS o, unnest(ARRAY['development', 'production']) AS e, generate_series(1, 2) AS n
ON CONFLICT DO NOTHING;

INSERT INTO entities (id, organization_id, environment, entity_type, data)
SELECT o || '-' || e || '-session-' || n, o, e, 'session',
       jsonb_build_object('studentId', o || '-' || e || '-student-' || (1 + n % 2),
                          'teacherId', o || '-teacher-' || (1 + n % 2),
                          'startTime', '2026-12-0' || n || 'T10:00:00Z', 'status', 'scheduled',
                          'paymentAmount', 'PAYMENT-' || o || '-' || e || '-' || n,
                          'guardianPhone', 'SESSION-PHONE-' || o || '-' || e || '-' || n,
                          'internalNotes', 'NOTES-' || o || '-' || e || '-' || n)
FROM unnest(ARRAY['acme', 'globex']) AS o, unnest(ARRAY['development', 'production']) AS e, generate_series(1, 4) AS n
ON CONFLICT DO NOTHING;

INSERT INTO entity_relations (id, organization_id, environment, from_id, to_id, relation_type)
SELECT o || '-' || e || '-rel-1', o, e, o || '-guardian-1', o || '-' || e || '-student-1', 'guardian_of'
FROM unnest(ARRAY['acme', 'globex']) AS o, unnest(ARRAY['development', 'production']) AS e
ON CONFLICT DO NOTHING;

INSERT INTO agent_configs (id, organization_id, environment, agent_id, system_prompt, model, tools)
SELECT a.id || '-' || e, a.organization_id, e, a.id, 'You are ' || a.name || ' (' || e || ')', 'gpt-4o', '["calendar"]'
FROM agents a, unnest(ARRAY['development', 'production']) AS e
ON CONFLICT DO NOTHING;

INSERT INTO threads (id, organization_id, environment, agent_id, user_id)
SELECT a.id || '-' || e || '-thread-1', a.organization_id, e, a.id, NULL
FROM agents a, unnest(ARRAY['development', 'production']) AS e
ON CONFLICT DO NOTHING;

INSERT INTO messages (id, organization_id, environment, thread_id, role, content)
SELECT t.id || '-msg-' || n, t.organization_id, t.environment, t.id, CASE n WHEN 1 THEN 'user' ELSE 'assistant' END,
       'MESSAGE ' || n || ' in ' || t.id
FROM threads t, generate_series(1, 2) AS n
ON CONFLICT DO NOTHING;

INSERT INTO trigger_runs (id, organization_id, environment, trigger, status)
SELECT o || '-' || e || '-run-1', o, e, 'nightly-digest', 'succeeded'
FROM unnest(ARRAY['acme', 'globex']) AS o, unnest(ARRAY['development', 'production']) AS e
ON CONFLICT DO NOTHING;
