-- A join with a shared table: sessions per organization name.
SELECT o.name, count(*) AS sessions FROM entities e JOIN organizations o ON o.id = e.organization_id WHERE e.entity_type = 'session' GROUP BY o.name;
