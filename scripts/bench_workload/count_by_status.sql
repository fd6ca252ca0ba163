-- Dashboard: the teacher's sessions by status.
SELECT data->>'status' AS status, count(*) FROM entities WHERE entity_type = 'session' GROUP BY 1 ORDER BY 1;
