-- Check helpers shared by the SQL tests, in schema t: t.ok and t.eq count a
-- passed check or raise (psql runs with ON_ERROR_STOP, so the file fails);
-- t.set and t.id name ids. The including file first sets its name:
--     SET t.name = 'registry_test';
--     \ir lib/t.sql
-- Not a test itself: scripts/test runs tests/sql/*.sql only.

CREATE SCHEMA t;
CREATE TABLE t.passed (n bigserial PRIMARY KEY, label text NOT NULL);
CREATE TABLE t.v (k text PRIMARY KEY, id bigint NOT NULL);

CREATE FUNCTION t.ok(p_cond boolean, p_label text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_cond IS NOT TRUE THEN
        RAISE EXCEPTION '%: FAILED: %', current_setting('t.name'), p_label;
    END IF;
    INSERT INTO t.passed (label) VALUES (p_label);
END
$$;

CREATE FUNCTION t.eq(p_got anycompatible, p_want anycompatible, p_label text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_got IS DISTINCT FROM p_want THEN
        RAISE EXCEPTION '%: FAILED: % (got %, want %)', current_setting('t.name'), p_label,
            p_got, p_want;
    END IF;
    INSERT INTO t.passed (label) VALUES (p_label);
END
$$;

-- named ids (people, communities, activities, offers ...)
CREATE FUNCTION t.set(p_k text, p_id bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO t.v (k, id) VALUES (p_k, p_id) ON CONFLICT (k) DO UPDATE SET id = excluded.id
$$;

CREATE FUNCTION t.id(p_k text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v bigint;
BEGIN
    SELECT id INTO v FROM t.v WHERE k = p_k;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: no id named %', current_setting('t.name'), p_k;
    END IF;
    RETURN v;
END
$$;

-- Every row of every table of a schema, hashed: equal before and after a
-- command means the command wrote nothing.
CREATE FUNCTION t.fp_of(p_schema text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    r    record;
    h    text;
    acc  text := '';
BEGIN
    FOR r IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = p_schema AND c.relkind IN ('r', 'p') ORDER BY c.relname LOOP
        EXECUTE format('SELECT count(*) || ''/'' || md5(coalesce(string_agg(x::text, E''\n'' ORDER BY x::text), '''')) FROM %I.%I x',
                       p_schema, r.relname) INTO h;
        acc := acc || r.relname || '=' || h || ' ';
    END LOOP;
    RETURN acc;
END
$$;
