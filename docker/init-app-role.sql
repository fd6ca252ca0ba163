-- The least-privilege role client traffic of environment keys runs as.
CREATE ROLE struere_app LOGIN PASSWORD 'app-password' NOSUPERUSER NOCREATEDB NOCREATEROLE;
GRANT USAGE, CREATE ON SCHEMA public TO struere_app;
