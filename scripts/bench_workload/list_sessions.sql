-- A teacher's schedule: the next scheduled sessions.
SELECT id, data->>'studentId' AS student, data->>'startTime' AS start_time, data->>'status' AS status FROM entities WHERE entity_type = 'session' AND data->>'status' = 'scheduled' ORDER BY data->>'startTime' LIMIT 20;
