-- One of the teacher's sessions by id (teacher 1 of acme/development holds every 50th id).
\set sid 1000000 + 50 * random(0, 99)
SELECT id, entity_type, data FROM entities WHERE id = :sid::text;
