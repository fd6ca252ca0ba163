-- The most recently created sessions (a time range on an indexed column).
SELECT id, data->>'startTime' AS start_time FROM entities WHERE entity_type = 'session' AND created_at >= now() - interval '30 days' ORDER BY created_at DESC, id LIMIT 10;
