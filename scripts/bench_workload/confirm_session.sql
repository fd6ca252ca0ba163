-- A write: the teacher confirms (or reschedules) one of its sessions; data is a jsonb column it
-- sees only in part, so the keys it cannot see must be kept.
\set sid 1000000 + 50 * random(0, 99)
UPDATE entities SET data = jsonb_set(data, '{status}', CASE WHEN data->>'status' = 'scheduled' THEN '"confirmed"' ELSE '"scheduled"' END::jsonb), updated_at = now() WHERE id = :sid::text;
