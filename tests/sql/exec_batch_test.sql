-- registry.exec_batch against registry.exec, differentially.
--
-- Runs on a fresh copy of a database with every service's migrations applied
-- (scripts/test, "SQL tests"): psql -v ON_ERROR_STOP=1 -f this file.
--
-- The contract of registry.exec_batch (004_lanes.sql): its replies, and the
-- state it leaves, are those of running the same commands one after another
-- through registry.exec, except that generated ids (check-in ids, outbox
-- numbers) may be assigned in another order. Batches go to it as the daemon
-- sends them, entry scans of verified activity tokens in the scan lane
-- (t.lane). This file builds a fixture
-- through registry.exec, generates batches of scan commands with a seeded
-- pseudo-random generator (entry scans for the set-based fast path mixed with
-- everything that must leave it: people not signed up, unknown people and
-- activities, exits, stations, refused tokens, expected_id mismatches,
-- repeated nonces and idempotency keys within and across batches, keys
-- reused by another command, scans without a nonce, uint64 counters as
-- decimal strings, scanned_at 0, bad arguments, and sign_up / get_activity
-- commands in the middle of scan runs), plus a few hand-made batches. Each
-- batch runs both ways on the same starting state (the first way inside a
-- subtransaction that is rolled back, the registry's sequences reset after
-- it), and these must agree:
--   * the replies, position by position (code, message, result with the
--     check-in id replaced by a stable name for the check-in);
--   * every registry table as a multiset of rows, without the columns that
--     are generated ids or wall-clock times, check-in ids renamed likewise;
--   * for each person, the order of the events about them.
-- The second way is committed, so later batches build on it (both ways take
-- turns being the committed one). Every check is a t.ok / t.eq call; a
-- divergence raises, which makes psql exit non-zero. The last line printed
-- is "exec_batch_test: N checks passed".

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

SET t.name = 'exec_batch_test';
\ir lib/t.sql
CREATE TABLE t.people (idx integer PRIMARY KEY, id bigint NOT NULL);
CREATE TABLE t.batches (b integer PRIMARY KEY, label text NOT NULL, cmds jsonb NOT NULL);
-- generator state: nonces and idempotency keys already handed out, and the
-- last counter of each scanner
CREATE TABLE t.nonces (n bigserial PRIMARY KEY, b integer NOT NULL, device text NOT NULL,
                       counter jsonb NOT NULL);
CREATE TABLE t.keys (n bigserial PRIMARY KEY, b integer NOT NULL, key text NOT NULL,
                     cmd jsonb NOT NULL);
CREATE TABLE t.devctr (device text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO t.devctr VALUES ('gate-1', 0), ('gate-2', 0), ('gate-3', 0), ('gate-4', 0),
                            ('gate-hi', 0);
-- scans the fast path answered (approximately: each run on the batch's
-- starting state), to show the generator exercises it
CREATE TABLE t.fast (b integer PRIMARY KEY, n integer NOT NULL);
-- reply codes seen
CREATE TABLE t.codes (code text PRIMARY KEY);

-- ---------------------------------------------------------------- checks

-- day d of the test calendar, plus ms
CREATE FUNCTION t.at(p_day integer, p_ms bigint DEFAULT 0) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT 1700000000000 + p_day * 86400000::bigint + p_ms
$$;

-- Runs a command through registry.exec that must succeed; returns its result.
CREATE FUNCTION t.okr(p_cmd text, p_args jsonb, p_label text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r registry.cmd_result;
BEGIN
    r := registry.exec(p_cmd, '', p_args, jsonb_build_object('now', t.at(0), 'trace_id', 'fixture'));
    IF r.code IS DISTINCT FROM 'ok' THEN
        RAISE EXCEPTION 'exec_batch_test: FAILED: %: % returned % (%), args %',
            p_label, p_cmd, r.code, r.message, p_args;
    END IF;
    INSERT INTO t.passed (label) VALUES (p_label);
    RETURN r.result;
END
$$;

-- ---------------------------------------------------------------- fixture

DO $$
DECLARE
    c1   bigint;
    c2   bigint;
    res  jsonb;
    i    integer;
    act  jsonb;
BEGIN
    c1 := (t.okr('create_community', '{"name": "Peony Court"}', 'fixture: community C1') ->> 'id')::bigint;
    c2 := (t.okr('create_community', '{"name": "Bamboo Row"}', 'fixture: community C2') ->> 'id')::bigint;
    PERFORM t.set('C1', c1);
    PERFORM t.set('C2', c2);
    FOR i IN 1 .. 48 LOOP
        res := t.okr('register_person',
                     jsonb_build_object('community_id', CASE WHEN i <= 40 THEN c1 ELSE c2 END,
                                        'name', 'Person ' || i),
                     'fixture: person ' || i);
        INSERT INTO t.people (idx, id) VALUES (i, (res ->> 'id')::bigint);
    END LOOP;
    act := jsonb_build_object('starts_at', t.at(1), 'ends_at', t.at(30),
                              'signup_opens_at', t.at(0), 'signup_closes_at', t.at(20),
                              'auto_checkout_at', t.at(31));
    -- walk-in: anybody may enter
    PERFORM t.set('W', (t.okr('create_activity', act || jsonb_build_object(
        'community_id', c1, 'title', 'Mahjong corner', 'capacity', 1000, 'walk_in', true),
        'fixture: walk-in activity') ->> 'id')::bigint);
    -- sign-up only, small enough to fill up and get a waiting list
    PERFORM t.set('S', (t.okr('create_activity', act || jsonb_build_object(
        'community_id', c1, 'title', 'Dumpling workshop', 'capacity', 24, 'walk_in', false),
        'fixture: sign-up activity') ->> 'id')::bigint);
    -- walk-in of the other community
    PERFORM t.set('X', (t.okr('create_activity', act || jsonb_build_object(
        'community_id', c2, 'title', 'Tai chi', 'capacity', 100, 'walk_in', true),
        'fixture: other community activity') ->> 'id')::bigint);
    FOR i IN 1 .. 14 LOOP
        res := t.okr('sign_up', jsonb_build_object('activity_id', t.id('S'),
                                                   'person_ids', jsonb_build_array(
                                                       (SELECT id FROM t.people WHERE idx = i))),
                     'fixture: sign-up ' || i);
        PERFORM t.eq(res ->> 'status', 'confirmed', 'fixture: sign-up ' || i || ' confirmed');
    END LOOP;
    res := t.okr('create_route', jsonb_build_object(
        'community_id', c1, 'name', 'Lantern walk', 'reward', 'A paper lantern',
        'stations', jsonb_build_array('Gate', 'Pond', 'Temple', 'Market')), 'fixture: route');
    PERFORM t.set('R', (res ->> 'id')::bigint);
    FOR i IN 1 .. 4 LOOP
        PERFORM t.set('ST' || i, (res -> 'station_ids' ->> (i - 1))::bigint);
    END LOOP;
END
$$;

-- ---------------------------------------------------------------- generator

CREATE FUNCTION t.rint(p_lo bigint, p_hi bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT p_lo + floor(random() * (p_hi - p_lo + 1))::bigint
$$;

CREATE FUNCTION t.person() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_idx bigint := t.rint(1, 48);
BEGIN
    RETURN (SELECT id FROM t.people WHERE idx = v_idx);
END
$$;

-- an activity that exists: W, S or X
CREATE FUNCTION t.activity() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r float8 := random();
BEGIN
    RETURN CASE WHEN r < 0.45 THEN t.id('W') WHEN r < 0.85 THEN t.id('S') ELSE t.id('X') END;
END
$$;

CREATE FUNCTION t.station() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN t.id('ST' || t.rint(1, 4));
END
$$;

-- the community a token for this subject claims
CREATE FUNCTION t.comm(p_kind text, p_subject bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(CASE p_kind
                        WHEN 'a' THEN (SELECT community_id FROM registry.activities WHERE id = p_subject)
                        WHEN 's' THEN (SELECT community_id FROM registry.stations WHERE id = p_subject)
                    END, t.id('C1'))
$$;

CREATE FUNCTION t.now(p_b integer, p_j integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT t.at(2) + p_b * 3600000::bigint + p_j * 1000::bigint
$$;

-- A fresh nonce {device_id, counter}: mostly small counters of four gates,
-- some uint64 counters above INT64_MAX written as decimal strings (as the
-- daemon's pbjson writes them), some scans without a nonce (device '').
CREATE FUNCTION t.nonce() RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r  float8 := random();
    d  text;
    n  bigint;
BEGIN
    IF r < 0.08 THEN
        RETURN jsonb_build_object('device_id', '', 'counter', t.rint(0, 3));
    END IF;
    d := CASE WHEN r < 0.2 THEN 'gate-hi' ELSE 'gate-' || t.rint(1, 4) END;
    UPDATE t.devctr SET n = devctr.n + t.rint(1, 3) WHERE device = d RETURNING devctr.n INTO n;
    IF d = 'gate-hi' THEN
        RETURN jsonb_build_object('device_id', d, 'counter',
            CASE WHEN random() < 0.5 THEN (9223372036854775807::numeric + n)::text
                 ELSE (18446744073709551615::numeric - n)::text END);
    END IF;
    RETURN jsonb_build_object('device_id', d, 'counter', n);
END
$$;

-- Scan arguments as the daemon writes them for a verified token, with the
-- optional fields varied; p_over overrides.
CREATE FUNCTION t.sargs(p_kind text, p_subject bigint, p_person bigint, p_now bigint,
                        p_over jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    a  jsonb;
    r  float8;
BEGIN
    a := jsonb_build_object('verdict', 'ok', 'kind', p_kind, 'subject_id', p_subject,
                            'community_id', t.comm(p_kind, p_subject), 'person_id', p_person)
         || t.nonce();
    IF random() < 0.05 THEN
        -- a token whose community is not the subject's: the subject's wins
        a := a || jsonb_build_object('community_id', t.id('C2'));
    END IF;
    r := random();
    IF r < 0.5 THEN
        a := a || '{"scanned_at": 0}';
    ELSIF r < 0.9 THEN
        a := a || jsonb_build_object('scanned_at', p_now - t.rint(0, 600000));
    END IF;
    r := random();
    IF r < 0.35 THEN
        NULL;
    ELSIF r < 0.65 THEN
        a := a || '{"direction": "DIRECTION_ENTRY"}';
    ELSIF r < 0.8 THEN
        a := a || '{"direction": 0}';
    ELSE
        a := a || '{"direction": null}';
    END IF;
    r := random();
    IF r < 0.15 THEN
        a := a || '{"expected_id": 0}';
    ELSIF r < 0.3 THEN
        a := a || jsonb_build_object('expected_id', p_subject);
    END IF;
    RETURN a || p_over;
END
$$;

-- A command {n, k, a, c}; an empty key is sent as "", as null or not at all.
-- Records its key and nonce for later repeats.
CREATE FUNCTION t.cmd(p_b integer, p_j integer, p_name text, p_key text, p_args jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    c  jsonb;
    r  float8 := random();
BEGIN
    c := jsonb_build_object('n', p_name, 'k', p_key, 'a', p_args,
                            'c', jsonb_build_object('now', t.now(p_b, p_j),
                                                    'trace_id', format('tr-%s-%s', p_b, p_j),
                                                    'source', 'exec_batch_test'));
    IF p_key = '' AND r < 0.33 THEN
        c := c - 'k';
    ELSIF p_key = '' AND r < 0.66 THEN
        c := jsonb_set(c, '{k}', 'null');
    END IF;
    IF p_key <> '' AND NOT EXISTS (SELECT 1 FROM t.keys WHERE key = p_key) THEN
        INSERT INTO t.keys (b, key, cmd) VALUES (p_b, p_key, c);
    END IF;
    IF p_name = 'scan' AND jsonb_typeof(p_args) = 'object'
       AND jsonb_typeof(p_args -> 'device_id') = 'string' AND p_args ->> 'device_id' <> '' THEN
        INSERT INTO t.nonces (b, device, counter)
        VALUES (p_b, p_args ->> 'device_id', p_args -> 'counter');
    END IF;
    RETURN c;
END
$$;

-- the same command sent again at position j (a retry): new ctx, same n, k, a
CREATE FUNCTION t.again(p_b integer, p_j integer, p_cmd jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT p_cmd || jsonb_build_object('c', jsonb_build_object(
        'now', t.now(p_b, p_j), 'trace_id', format('tr-%s-%s', p_b, p_j),
        'source', 'exec_batch_test'))
$$;

CREATE FUNCTION t.fresh_key(p_b integer, p_j integer, p_p float8) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN random() < p_p THEN format('key-%s-%s', p_b, p_j) ELSE '' END
$$;

-- scan arguments that registry.exec answers with invalid_argument (or that
-- exercise an odd but valid encoding)
CREATE FUNCTION t.odd_args(p_now bigint) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    a  jsonb := t.sargs('a', t.activity(), t.person(), p_now);
BEGIN
    RETURN CASE t.rint(1, 15)
        WHEN 1 THEN a || '{"person_id": 0}'
        WHEN 2 THEN a || '{"scanned_at": -5}'
        WHEN 3 THEN a || jsonb_build_object('device_id', repeat('d', 65), 'counter', t.rint(1, 1000))
        WHEN 4 THEN a || jsonb_build_object('device_id', 'gate-odd', 'counter', -3)
        WHEN 5 THEN a || jsonb_build_object('device_id', 'gate-odd', 'counter', '18446744073709551616')
        WHEN 6 THEN a || '{"verdict": "weird"}'
        WHEN 7 THEN a || '{"kind": "x"}'
        WHEN 8 THEN a || '{"direction": "DIRECTION_SIDEWAYS"}'
        WHEN 9 THEN a || '{"direction": 7}'
        WHEN 10 THEN a || '{"subject_id": 0}'
        WHEN 11 THEN a || jsonb_build_object('device_id', 'gate-odd', 'counter', 1.5)
        -- valid: a small counter as a string, with leading zeros
        WHEN 12 THEN a || jsonb_build_object('device_id', 'gate-odd',
                                             'counter', lpad(t.rint(1, 99999)::text, 8, '0'))
        WHEN 13 THEN a || '{"expected_id": -4}'
        WHEN 14 THEN a - 'verdict'
        ELSE a || '{"person_id": null, "community_id": null}'
    END;
END
$$;

-- Batch b: p_n commands.
CREATE FUNCTION t.gen(p_b integer, p_n integer, p_label text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    cmds   jsonb := '[]';
    c      jsonb;
    a      jsonb;
    prev   jsonb;
    j      integer;
    r      float8;
    now    bigint;
    key    text;
    subj   bigint;
    pid    bigint;
    cand   integer[];
    kk     integer;
    v_nonce t.nonces;
    v_key   t.keys;
    v_cnt   bigint;
BEGIN
    FOR j IN 0 .. p_n - 1 LOOP
        now := t.now(p_b, j);
        r := random();
        key := t.fresh_key(p_b, j, 0.5);
        IF r < 0.34 THEN
            -- plain entry scan: the fast path's case
            subj := t.activity();
            c := t.cmd(p_b, j, 'scan', key, t.sargs('a', subj, t.person(), now));
        ELSIF r < 0.38 THEN
            -- unknown person
            c := t.cmd(p_b, j, 'scan', key,
                       t.sargs('a', t.activity(), 900000 + t.rint(1, 40), now));
        ELSIF r < 0.41 THEN
            -- unknown activity id
            c := t.cmd(p_b, j, 'scan', key,
                       t.sargs('a', 700000 + t.rint(1, 5), t.person(), now));
        ELSIF r < 0.49 THEN
            -- exit
            c := t.cmd(p_b, j, 'scan', key,
                       t.sargs('a', t.activity(), t.person(), now,
                               CASE WHEN random() < 0.8 THEN '{"direction": "DIRECTION_EXIT"}'
                                    ELSE '{"direction": 1}' END::jsonb));
        ELSIF r < 0.56 THEN
            -- route station (sometimes an exit, sometimes no such station)
            subj := CASE WHEN random() < 0.05 THEN 600000 + t.rint(1, 3) ELSE t.station() END;
            c := t.cmd(p_b, j, 'scan', key,
                       t.sargs('s', subj, t.person(), now,
                               CASE WHEN random() < 0.1 THEN '{"direction": "DIRECTION_EXIT"}'
                                    ELSE '{}' END::jsonb));
        ELSIF r < 0.62 THEN
            -- a refused token: expired keeps its claims, forged and malformed have none
            kk := t.rint(1, 4);
            IF kk = 1 THEN
                a := t.sargs('a', t.activity(), t.person(), now, '{"verdict": "expired"}');
            ELSIF kk = 2 THEN
                a := t.sargs('s', t.station(), t.person(), now, '{"verdict": "expired"}');
            ELSE
                a := t.sargs('a', t.activity(), t.person(), now,
                             jsonb_build_object('verdict', CASE kk WHEN 3 THEN 'forged' ELSE 'malformed' END))
                     - 'kind' - 'subject_id' - 'community_id';
            END IF;
            c := t.cmd(p_b, j, 'scan', key, a);
        ELSIF r < 0.65 THEN
            -- the scanner expects another activity or station
            subj := t.activity();
            c := t.cmd(p_b, j, 'scan', key,
                       t.sargs('a', subj, t.person(), now, jsonb_build_object('expected_id',
                           CASE WHEN random() < 0.5 THEN t.station()
                                WHEN subj = t.id('W') THEN t.id('S') ELSE t.id('W') END)));
        ELSIF r < 0.71 THEN
            -- a nonce already used in this batch: the same scan again, or another one
            SELECT array_agg(x.i - 1) INTO cand
              FROM jsonb_array_elements(cmds) WITH ORDINALITY AS x (e, i)
             WHERE x.e ->> 'n' = 'scan' AND jsonb_typeof(x.e -> 'a') = 'object'
               AND jsonb_typeof(x.e -> 'a' -> 'device_id') = 'string'
               AND x.e -> 'a' ->> 'device_id' <> '';
            IF cand IS NULL THEN
                c := t.cmd(p_b, j, 'scan', key, t.sargs('a', t.activity(), t.person(), now));
            ELSE
                prev := cmds -> cand[t.rint(1, cardinality(cand))];
                IF random() < 0.5 THEN
                    a := prev -> 'a';
                ELSE
                    a := t.sargs('a', t.activity(), t.person(), now)
                         || jsonb_build_object('device_id', prev -> 'a' -> 'device_id',
                                               'counter', prev -> 'a' -> 'counter');
                END IF;
                c := t.cmd(p_b, j, 'scan', key, a);
            END IF;
        ELSIF r < 0.74 THEN
            -- a nonce of an earlier batch
            SELECT count(*) INTO v_cnt FROM t.nonces WHERE b < p_b;
            IF v_cnt = 0 THEN
                c := t.cmd(p_b, j, 'scan', key, t.sargs('a', t.activity(), t.person(), now));
            ELSE
                SELECT * INTO v_nonce FROM t.nonces WHERE b < p_b ORDER BY t.nonces.n
                 OFFSET t.rint(0, v_cnt - 1) LIMIT 1;
                c := t.cmd(p_b, j, 'scan', key,
                           t.sargs('a', t.activity(), t.person(), now)
                           || jsonb_build_object('device_id', v_nonce.device,
                                                 'counter', v_nonce.counter));
            END IF;
        ELSIF r < 0.78 THEN
            -- an idempotency key already used in this batch: a retry, or
            -- another scan under the same key
            SELECT array_agg(x.i - 1) INTO cand
              FROM jsonb_array_elements(cmds) WITH ORDINALITY AS x (e, i)
             WHERE coalesce(x.e ->> 'k', '') <> '';
            IF cand IS NULL THEN
                c := t.cmd(p_b, j, 'scan', key, t.sargs('a', t.activity(), t.person(), now));
            ELSE
                prev := cmds -> cand[t.rint(1, cardinality(cand))];
                IF random() < 0.7 THEN
                    c := t.again(p_b, j, prev);
                ELSE
                    c := t.cmd(p_b, j, 'scan', prev ->> 'k',
                               t.sargs('a', t.activity(), t.person(), now));
                END IF;
            END IF;
        ELSIF r < 0.81 THEN
            -- an idempotency key of an earlier batch
            SELECT count(*) INTO v_cnt FROM t.keys WHERE b < p_b;
            IF v_cnt = 0 THEN
                c := t.cmd(p_b, j, 'scan', key, t.sargs('a', t.activity(), t.person(), now));
            ELSE
                SELECT * INTO v_key FROM t.keys WHERE b < p_b ORDER BY t.keys.n
                 OFFSET t.rint(0, v_cnt - 1) LIMIT 1;
                IF random() < 0.6 THEN
                    c := t.again(p_b, j, v_key.cmd);
                ELSE
                    c := t.cmd(p_b, j, 'scan', v_key.key,
                               t.sargs('a', t.activity(), t.person(), now));
                END IF;
            END IF;
        ELSIF r < 0.83 THEN
            -- a key used before by another command
            SELECT count(*) INTO v_cnt FROM t.keys;
            IF v_cnt = 0 THEN
                c := t.cmd(p_b, j, 'get_activity', key, jsonb_build_object('activity_id', t.id('W')));
            ELSE
                SELECT * INTO v_key FROM t.keys ORDER BY t.keys.n OFFSET t.rint(0, v_cnt - 1) LIMIT 1;
                IF v_key.cmd ->> 'n' = 'scan' THEN
                    IF random() < 0.5 THEN
                        c := t.cmd(p_b, j, 'sign_up', v_key.key, jsonb_build_object(
                                'activity_id', t.id('S'), 'person_ids', jsonb_build_array(t.person())));
                    ELSE
                        c := t.cmd(p_b, j, 'get_activity', v_key.key,
                                   jsonb_build_object('activity_id', t.id('S')));
                    END IF;
                ELSE
                    c := t.cmd(p_b, j, 'scan', v_key.key, t.sargs('a', t.activity(), t.person(), now));
                END IF;
            END IF;
        ELSIF r < 0.86 THEN
            -- bad or odd arguments
            kk := t.rint(1, 10);
            IF kk = 1 THEN
                c := t.cmd(p_b, j, 'scan', key, '["not", "an", "object"]');
            ELSIF kk = 2 THEN
                c := t.cmd(p_b, j, 'scan', repeat('k', 257), t.sargs('a', t.activity(), t.person(), now));
            ELSE
                c := t.cmd(p_b, j, 'scan', key, t.odd_args(now));
            END IF;
        ELSIF r < 0.92 THEN
            -- sign_up in the middle of the scans
            pid := t.person();
            a := jsonb_build_object(
                'activity_id', CASE WHEN random() < 0.85 THEN t.id('S')
                                    WHEN random() < 0.8 THEN t.id('W') ELSE 700001 END,
                'person_ids', CASE WHEN random() < 0.8 THEN jsonb_build_array(pid)
                                   ELSE (SELECT jsonb_agg(DISTINCT x)
                                           FROM unnest(ARRAY[pid, t.person()]) AS x) END,
                'join_waitlist', random() < 0.6);
            c := t.cmd(p_b, j, 'sign_up', t.fresh_key(p_b, j, 0.5), a);
        ELSIF r < 0.96 THEN
            c := t.cmd(p_b, j, 'get_activity', t.fresh_key(p_b, j, 0.3),
                       jsonb_build_object('activity_id', CASE WHEN random() < 0.9 THEN t.activity()
                                                              ELSE 700002 END));
        ELSE
            -- the person of the previous scan again, at another activity or a station
            prev := cmds -> (jsonb_array_length(cmds) - 1);
            IF prev ->> 'n' = 'scan' AND jsonb_typeof(prev -> 'a') = 'object'
               AND jsonb_typeof(prev -> 'a' -> 'person_id') = 'number' THEN
                pid := (prev -> 'a' ->> 'person_id')::bigint;
            ELSE
                pid := t.person();
            END IF;
            IF random() < 0.5 THEN
                c := t.cmd(p_b, j, 'scan', key, t.sargs('s', t.station(), pid, now));
            ELSE
                c := t.cmd(p_b, j, 'scan', key, t.sargs('a', t.activity(), pid, now));
            END IF;
        END IF;
        cmds := cmds || jsonb_build_array(c);
    END LOOP;
    INSERT INTO t.batches (b, label, cmds) VALUES (p_b, p_label, cmds);
END
$$;

-- A hand-made batch: p_cmds are [name, key, args] triples.
CREATE FUNCTION t.hand(p_b integer, p_label text, p_cmds jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    cmds  jsonb := '[]';
    j     integer;
BEGIN
    FOR j IN 0 .. jsonb_array_length(p_cmds) - 1 LOOP
        cmds := cmds || jsonb_build_array(t.cmd(p_b, j, p_cmds -> j ->> 0, p_cmds -> j ->> 1,
                                                p_cmds -> j -> 2));
    END LOOP;
    INSERT INTO t.batches (b, label, cmds) VALUES (p_b, p_label, cmds);
END
$$;

CREATE FUNCTION t.p(p_idx integer) RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT id FROM t.people WHERE idx = p_idx $$;

-- plain entry scan arguments with a fresh nonce on gate-9
CREATE FUNCTION t.entry(p_subject bigint, p_person bigint, p_over jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO t.devctr VALUES ('gate-9', 1)
    ON CONFLICT (device) DO UPDATE SET n = devctr.n + 1 RETURNING devctr.n INTO n;
    RETURN jsonb_build_object('verdict', 'ok', 'kind', 'a', 'subject_id', p_subject,
                              'community_id', t.comm('a', p_subject), 'person_id', p_person,
                              'device_id', 'gate-9', 'counter', n, 'scanned_at', 0) || p_over;
END
$$;

DO $$
DECLARE
    w   bigint := t.id('W');
    s   bigint := t.id('S');
    x   bigint := t.id('X');
    st  bigint := t.id('ST1');
BEGIN
    PERFORM setseed(0.20240917);
    PERFORM t.gen(1, 110, 'random 1');
    PERFORM t.gen(2, 120, 'random 2');
    -- hand-made batches between the random ones, on a state with history
    PERFORM t.hand(3, 'empty batch', '[]');
    PERFORM t.hand(4, 'a single scan', jsonb_build_array(
        jsonb_build_array('scan', '', t.entry(w, t.p(44)))));
    PERFORM t.hand(5, 'runs of one scan between other commands', jsonb_build_array(
        jsonb_build_array('scan', 'h5-a', t.entry(x, t.p(45))),
        jsonb_build_array('get_activity', '', jsonb_build_object('activity_id', x)),
        jsonb_build_array('scan', '', t.entry(w, t.p(45))),
        jsonb_build_array('sign_up', 'h5-b', jsonb_build_object('activity_id', s,
                                                                'person_ids', jsonb_build_array(t.p(45)),
                                                                'join_waitlist', true)),
        jsonb_build_array('scan', 'h5-c', t.entry(s, t.p(45))),
        jsonb_build_array('get_activity', '', jsonb_build_object('activity_id', s))));
    PERFORM t.hand(6, 'one person at a station, then entering', jsonb_build_array(
        jsonb_build_array('scan', '', jsonb_build_object(
            'verdict', 'ok', 'kind', 's', 'subject_id', st, 'community_id', t.comm('s', st),
            'person_id', t.p(46), 'device_id', 'gate-9', 'counter', 100000, 'scanned_at', 0)),
        jsonb_build_array('scan', '', t.entry(w, t.p(47))),
        jsonb_build_array('scan', '', t.entry(w, t.p(46))),
        jsonb_build_array('scan', '', t.entry(x, t.p(48)))));
    PERFORM t.hand(7, 'one person refused, then entering', jsonb_build_array(
        jsonb_build_array('scan', '', t.entry(w, t.p(43), '{"verdict": "expired"}')),
        jsonb_build_array('scan', '', t.entry(x, t.p(43))),
        jsonb_build_array('scan', '', t.entry(w, t.p(42), '{"direction": "DIRECTION_EXIT"}')),
        jsonb_build_array('scan', '', t.entry(s, t.p(42)))));
    PERFORM t.hand(8, 'entry, exit and entry again of one pair; a key retried in the run',
        jsonb_build_array(
        jsonb_build_array('scan', 'h8-a', t.entry(x, t.p(41))),
        jsonb_build_array('scan', 'h8-b', t.entry(x, t.p(41), '{"direction": "DIRECTION_EXIT"}')),
        jsonb_build_array('scan', 'h8-c', t.entry(x, t.p(41))),
        jsonb_build_array('scan', 'h8-d', t.entry(w, t.p(40))),
        jsonb_build_array('scan', 'h8-d', t.entry(w, t.p(40))),
        jsonb_build_array('scan', 'h8-e', t.entry(w, t.p(39))),
        jsonb_build_array('scan', 'h5-b', t.entry(w, t.p(38))),
        jsonb_build_array('scan', '', t.entry(w, t.p(37), '{"device_id": "", "counter": 0}')),
        jsonb_build_array('scan', '', t.entry(x, t.p(37), '{"device_id": "", "counter": 0}'))));
    PERFORM t.gen(9, 120, 'random 9');
    PERFORM t.gen(10, 120, 'random 10');
    PERFORM t.gen(11, 120, 'random 11');
    PERFORM t.gen(12, 100, 'random 12');
END
$$;

-- ---------------------------------------------------------------- running

-- The registry's sequences, to run the second way with the same ids
CREATE FUNCTION t.seq_save() RETURNS jsonb
LANGUAGE sql AS $$
    SELECT coalesce(jsonb_object_agg(format('%I.%I', schemaname, sequencename),
                                     jsonb_build_object('last', last_value, 'start', start_value)),
                    '{}')
      FROM pg_sequences WHERE schemaname = 'registry'
$$;

CREATE FUNCTION t.seq_restore(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k  text;
    v  jsonb;
BEGIN
    FOR k, v IN SELECT * FROM jsonb_each(p) LOOP
        IF jsonb_typeof(v -> 'last') = 'null' THEN
            PERFORM setval(k::regclass, (v ->> 'start')::bigint, false);
        ELSE
            PERFORM setval(k::regclass, (v ->> 'last')::bigint, true);
        END IF;
    END LOOP;
END
$$;

-- One by one through registry.exec: [{code, message, result}, ...]
CREATE FUNCTION t.run_exec(p_cmds jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c    jsonb;
    r    registry.cmd_result;
    out  jsonb := '[]';
BEGIN
    FOR c IN SELECT e FROM jsonb_array_elements(p_cmds) WITH ORDINALITY AS x (e, i) ORDER BY i LOOP
        r := registry.exec(c ->> 'n', c ->> 'k', c -> 'a', c -> 'c');
        out := out || jsonb_build_array(jsonb_build_object(
            'i', jsonb_array_length(out), 'code', r.code, 'message', r.message,
            'result', r.result::text));
    END LOOP;
    RETURN out;
END
$$;

-- An integral JSON number within bigint, else NULL.
CREATE FUNCTION t.jint(p_j jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_j) = 'number'
                     AND (p_j #>> '{}')::numeric = trunc((p_j #>> '{}')::numeric)
                     AND (p_j #>> '{}')::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
                THEN (p_j #>> '{}')::numeric::bigint END
$$;

-- A scan counter as the daemon has it, a uint64 (a JSON number, or a decimal
-- string as pbjson writes one past INT64_MAX, or absent: 0), stored
-- two's-complement; NULL for anything else.
CREATE FUNCTION t.jctr(p_j jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v IS NULL OR v <> trunc(v) OR v < 0 OR v > 18446744073709551615 THEN NULL
                WHEN v > 9223372036854775807 THEN (v - 18446744073709551616)::bigint
                ELSE v::bigint END
      FROM (SELECT CASE WHEN p_j IS NULL THEN 0
                        WHEN jsonb_typeof(p_j) = 'number' THEN (p_j #>> '{}')::numeric
                        WHEN jsonb_typeof(p_j) = 'string' AND p_j #>> '{}' ~ '^[0-9]{1,20}$'
                            THEN (p_j #>> '{}')::numeric
                   END AS v) x
$$;

-- The batch as the daemon sends it (registry.c, s_scan_lane_submit): every
-- scan it would put in the scan lane, an entry scan of a verified activity
-- token for the activity the scanner expects, as a JSON null in cmds and a
-- row of the lane's arrays; everything else as it is. The JSON the daemon
-- writes from protobuf has only the Scan fields with their JSON types;
-- anything else here was never daemon output and stays JSON.
CREATE FUNCTION t.lane(p_cmds jsonb,
    OUT cmds jsonb, OUT key text[], OUT now bigint[], OUT trace text[], OUT source text[],
    OUT person bigint[], OUT subject bigint[], OUT community bigint[], OUT device text[],
    OUT counter bigint[], OUT at bigint[], OUT expected bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    e    jsonb;
    a    jsonb;
    c    jsonb;
    v_now bigint;
BEGIN
    cmds := '[]';
    key := '{}'; now := '{}'; trace := '{}'; source := '{}'; person := '{}'; subject := '{}';
    community := '{}'; device := '{}'; counter := '{}'; at := '{}'; expected := '{}';
    FOR e IN SELECT x.e FROM jsonb_array_elements(p_cmds) WITH ORDINALITY AS x (e, ord)
              ORDER BY x.ord LOOP
        a := e -> 'a';
        c := e -> 'c';
        v_now := t.jint(c -> 'now');
        IF e ->> 'n' = 'scan' AND jsonb_typeof(a) = 'object' AND jsonb_typeof(c) = 'object'
           AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(a) k
                            WHERE k NOT IN ('verdict', 'kind', 'subject_id', 'community_id',
                                            'person_id', 'device_id', 'counter', 'scanned_at',
                                            'expected_id', 'direction'))
           AND a -> 'verdict' = '"ok"' AND a -> 'kind' = '"a"'
           AND t.jint(a -> 'subject_id') > 0 AND t.jint(a -> 'community_id') IS NOT NULL
           AND t.jint(a -> 'person_id') > 0
           AND coalesce(jsonb_typeof(a -> 'device_id') = 'string'
                        AND octet_length(a ->> 'device_id') <= 64, a -> 'device_id' IS NULL)
           AND t.jctr(a -> 'counter') IS NOT NULL
           AND t.jint(a -> 'scanned_at') >= 0
           AND coalesce(t.jint(a -> 'expected_id') IN (0, t.jint(a -> 'subject_id')),
                        a -> 'expected_id' IS NULL)
           AND coalesce(a -> 'direction' IN ('"DIRECTION_ENTRY"', '0'), a -> 'direction' IS NULL)
           AND coalesce(jsonb_typeof(e -> 'k') = 'string', e -> 'k' IS NULL)
           AND coalesce(jsonb_typeof(c -> 'trace_id') = 'string', c -> 'trace_id' IS NULL)
           AND coalesce(jsonb_typeof(c -> 'source') = 'string', c -> 'source' IS NULL)
           AND v_now IS NOT NULL THEN
            cmds := cmds || 'null'::jsonb;
            key := key || coalesce(e ->> 'k', '');
            now := now || v_now;
            trace := trace || coalesce(c ->> 'trace_id', '');
            source := source || coalesce(c ->> 'source', '');
            person := person || t.jint(a -> 'person_id');
            subject := subject || t.jint(a -> 'subject_id');
            community := community || t.jint(a -> 'community_id');
            device := device || coalesce(a ->> 'device_id', '');
            counter := counter || t.jctr(a -> 'counter');
            -- the daemon resolves a missing time to now before it sends
            at := at || CASE WHEN t.jint(a -> 'scanned_at') = 0 THEN v_now
                             ELSE t.jint(a -> 'scanned_at') END;
            expected := expected || coalesce(t.jint(a -> 'expected_id'), 0);
        ELSE
            cmds := cmds || jsonb_build_array(e);
        END IF;
    END LOOP;
END
$$;

-- As one statement through registry.exec_batch, in the daemon's form: its
-- rows, as returned
CREATE FUNCTION t.run_batch(p_cmds jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    out jsonb;
    l   record;
BEGIN
    l := t.lane(p_cmds);
    SELECT coalesce(jsonb_agg(jsonb_build_object('i', x.i, 'code', x.code, 'message', x.message,
                                                 'result', x.result)), '[]')
      INTO out
      FROM registry.exec_batch(l.cmds, l.key, l.now, l.trace, l.source, l.person, l.subject,
                               l.community, l.device, l.counter, l.at, l.expected) x;
    RETURN out;
END
$$;

-- A check-in's stable name: subject, person and its rank among that pair's
-- check-ins (the ids themselves may be assigned in another order)
CREATE FUNCTION t.ref(p_id jsonb, p_map jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_id IS NULL OR jsonb_typeof(p_id) <> 'number' THEN p_id
                WHEN p_id = '0' THEN p_id
                ELSE coalesce(p_map -> (p_id #>> '{}'), to_jsonb('dangling ' || (p_id #>> '{}')))
           END
$$;

CREATE FUNCTION t.norm(p_j jsonb, p_map jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_j) = 'object' AND p_j ? 'checkin_id'
                THEN jsonb_set(p_j, '{checkin_id}', t.ref(p_j -> 'checkin_id', p_map))
                ELSE p_j END
$$;

-- One row of a registry table without its generated ids and wall-clock
-- times, check-in ids replaced by their names.
CREATE FUNCTION t.norm_row(p_rel text, p_j jsonb, p_map jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_rel
        WHEN 'checkins' THEN (p_j - 'id') || jsonb_build_object('ref', t.ref(p_j -> 'id', p_map))
        WHEN 'scans' THEN t.norm(p_j - 'id', p_map)
        WHEN 'stamps' THEN t.norm(p_j, p_map)
        WHEN 'command_log' THEN jsonb_set(p_j - 'created_at', '{result}',
                                          t.norm(p_j -> 'result', p_map))
        WHEN 'outbox' THEN jsonb_set(p_j - 'id' - 'seq' - 'event_id' - 'created_at' - 'published_at',
                                     '{payload}', t.norm(p_j -> 'payload', p_map))
        ELSE p_j
    END
$$;

-- The registry's state: {"map": check-in names, "tables": {table: sorted
-- normalized rows}, "persons": {person_id: their events in order}}
CREATE FUNCTION t.state() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_map     jsonb;
    v_tables  jsonb := '{}';
    v_rows    jsonb;
    v_persons jsonb;
    rel       text;
BEGIN
    SELECT coalesce(jsonb_object_agg(id::text, ref), '{}') INTO v_map
      FROM (SELECT c.id, format('%s/%s/%s#%s', coalesce(c.activity_id, 0), coalesce(c.station_id, 0),
                                c.person_id,
                                row_number() OVER (PARTITION BY c.activity_id, c.station_id, c.person_id
                                                   ORDER BY c.id)) AS ref
              FROM registry.checkins c) m;
    FOR rel IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'registry' AND c.relkind IN ('r', 'p') ORDER BY c.relname LOOP
        EXECUTE format('SELECT coalesce(jsonb_agg(x ORDER BY x), ''[]'') '
                       'FROM (SELECT t.norm_row(%L, to_jsonb(r), $1) AS x FROM registry.%I r) s',
                       rel, rel)
           INTO v_rows USING v_map;
        v_tables := v_tables || jsonb_build_object(rel, v_rows);
    END LOOP;
    -- the outbox's order: its id, or its seq when it has no id
    SELECT coalesce(jsonb_object_agg(p, evs), '{}') INTO v_persons
      FROM (SELECT o.j -> 'payload' ->> 'person_id' AS p,
                   jsonb_agg(t.norm_row('outbox', o.j, v_map)
                             ORDER BY coalesce((o.j ->> 'id')::bigint, (o.j ->> 'seq')::bigint)) AS evs
              FROM (SELECT to_jsonb(x) AS j FROM registry.outbox x) o
             WHERE o.j -> 'payload' ? 'person_id'
             GROUP BY 1) s;
    RETURN jsonb_build_object('map', v_map, 'tables', v_tables, 'persons', v_persons);
END
$$;

-- What one side has and the other lacks (a few rows each way).
CREATE FUNCTION t.diff(p_a jsonb, p_b jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format(E'\n  only one by one: %s\n  only exec_batch: %s',
        (SELECT coalesce(string_agg(e::text, E'\n    '), '-') FROM (
            SELECT e FROM (SELECT e FROM jsonb_array_elements(p_a) e
                           EXCEPT ALL SELECT e FROM jsonb_array_elements(p_b) e) d LIMIT 6) d),
        (SELECT coalesce(string_agg(e::text, E'\n    '), '-') FROM (
            SELECT e FROM (SELECT e FROM jsonb_array_elements(p_b) e
                           EXCEPT ALL SELECT e FROM jsonb_array_elements(p_a) e) d LIMIT 6) d))
$$;

-- Scans the fast path answers when the batch's lane runs are each given to
-- it on the starting state (approximate; only to show the generator reaches
-- it). The caller rolls back.
CREATE FUNCTION t.fast_count(p_cmds jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    l    record;
    v_n  integer;
    v_i  integer := 0;
    v_j  integer;
    v_r  integer := 0;   -- lane rows used
    v_f  integer := 0;
    k    integer;
BEGIN
    l := t.lane(p_cmds);
    v_n := jsonb_array_length(l.cmds);
    WHILE v_i < v_n LOOP
        IF jsonb_typeof(l.cmds -> v_i) <> 'null' THEN
            v_i := v_i + 1;
            CONTINUE;
        END IF;
        v_j := v_i;
        WHILE v_j < v_n AND jsonb_typeof(l.cmds -> v_j) = 'null' LOOP
            v_j := v_j + 1;
        END LOOP;
        SELECT count(*) INTO k
          FROM registry.s_scan_lane(v_i, l.key[v_r + 1 : v_r + v_j - v_i],
                   l.now[v_r + 1 : v_r + v_j - v_i], l.trace[v_r + 1 : v_r + v_j - v_i],
                   l.person[v_r + 1 : v_r + v_j - v_i], l.subject[v_r + 1 : v_r + v_j - v_i],
                   l.community[v_r + 1 : v_r + v_j - v_i], l.device[v_r + 1 : v_r + v_j - v_i],
                   l.counter[v_r + 1 : v_r + v_j - v_i], l.at[v_r + 1 : v_r + v_j - v_i],
                   l.expected[v_r + 1 : v_r + v_j - v_i])
         WHERE code IS NOT NULL;
        v_f := v_f + k;
        v_r := v_r + v_j - v_i;
        v_i := v_j;
    END LOOP;
    RETURN v_f;
END
$$;

-- Runs batch b both ways from the same state and compares; the second way
-- stays committed.
CREATE FUNCTION t.check_batch(p_b integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_cmds      jsonb;
    v_label     text;
    v_n         integer;
    v_seqs      jsonb := t.seq_save();
    v_batch_first boolean := p_b % 2 = 1;
    v_first     jsonb;
    v_first_st  jsonb;
    v_second    jsonb;
    v_second_st jsonb;
    v_fast      integer;
    v_e         jsonb;   -- replies one by one, by position
    v_b         jsonb;   -- replies of exec_batch, by position
    v_es        jsonb;
    v_bs        jsonb;
    v_rows      jsonb;
    rel         text;
    k           integer;
    x           jsonb;
    y           jsonb;
    v_lbl       text;
BEGIN
    SELECT cmds, label INTO v_cmds, v_label FROM t.batches WHERE b = p_b;
    v_n := jsonb_array_length(v_cmds);
    v_lbl := format('batch %s (%s, %s commands)', p_b, v_label, v_n);

    BEGIN
        v_fast := t.fast_count(v_cmds);
        RAISE EXCEPTION 'roll back' USING ERRCODE = 'LXRB1';
    EXCEPTION WHEN SQLSTATE 'LXRB1' THEN
        NULL;
    END;
    INSERT INTO t.fast (b, n) VALUES (p_b, v_fast);
    PERFORM t.seq_restore(v_seqs);

    BEGIN
        IF v_batch_first THEN
            v_first := t.run_batch(v_cmds);
        ELSE
            v_first := t.run_exec(v_cmds);
        END IF;
        v_first_st := t.state();
        RAISE EXCEPTION 'roll back' USING ERRCODE = 'LXRB2';
    EXCEPTION WHEN SQLSTATE 'LXRB2' THEN
        NULL;
    END;
    PERFORM t.seq_restore(v_seqs);
    IF v_batch_first THEN
        v_second := t.run_exec(v_cmds);
    ELSE
        v_second := t.run_batch(v_cmds);
    END IF;
    v_second_st := t.state();
    IF v_batch_first THEN
        v_b := v_first; v_bs := v_first_st; v_e := v_second; v_es := v_second_st;
    ELSE
        v_e := v_first; v_es := v_first_st; v_b := v_second; v_bs := v_second_st;
    END IF;

    -- exactly one row per command, i covering 0 .. n-1
    PERFORM t.eq(jsonb_array_length(v_b), v_n, v_lbl || ': exec_batch returns one row per command');
    PERFORM t.eq((SELECT count(DISTINCT (e ->> 'i')::integer) FROM jsonb_array_elements(v_b) e)::integer,
                 v_n, v_lbl || ': exec_batch rows have distinct i');
    PERFORM t.ok((SELECT bool_and((e ->> 'i')::integer BETWEEN 0 AND v_n - 1)
                    FROM jsonb_array_elements(v_b) e) IS NOT FALSE,
                 v_lbl || ': exec_batch i within 0 .. n-1');
    PERFORM t.ok((SELECT bool_and(e ->> 'code' IS NOT NULL AND e ->> 'message' IS NOT NULL
                                  AND e ->> 'result' IS NOT NULL)
                    FROM jsonb_array_elements(v_b) e) IS NOT FALSE,
                 v_lbl || ': exec_batch rows have a code, a message and a result');

    -- the replies, by position
    SELECT coalesce(jsonb_agg(e ORDER BY (e ->> 'i')::integer), '[]') INTO v_b
      FROM jsonb_array_elements(v_b) e;
    FOR k IN 0 .. v_n - 1 LOOP
        x := v_e -> k;
        y := v_b -> k;
        x := jsonb_build_object('code', x -> 'code', 'message', x -> 'message',
                                'result', t.norm((x ->> 'result')::jsonb, v_es -> 'map'));
        y := jsonb_build_object('code', y -> 'code', 'message', y -> 'message',
                                'result', t.norm((y ->> 'result')::jsonb, v_bs -> 'map'));
        IF x IS DISTINCT FROM y THEN
            RAISE EXCEPTION E'exec_batch_test: FAILED: %: reply % differs\n  command: %\n  one by one: %\n  exec_batch: %',
                v_lbl, k, v_cmds -> k, x, y;
        END IF;
        INSERT INTO t.passed (label) VALUES (v_lbl || ': reply ' || k);
    END LOOP;

    -- every table, as a multiset of normalized rows
    FOR rel IN SELECT jsonb_object_keys(v_es -> 'tables') UNION SELECT jsonb_object_keys(v_bs -> 'tables')
                ORDER BY 1 LOOP
        IF (v_es -> 'tables' -> rel) IS DISTINCT FROM (v_bs -> 'tables' -> rel) THEN
            RAISE EXCEPTION 'exec_batch_test: FAILED: %: table % differs%', v_lbl, rel,
                t.diff(coalesce(v_es -> 'tables' -> rel, '[]'), coalesce(v_bs -> 'tables' -> rel, '[]'));
        END IF;
        INSERT INTO t.passed (label) VALUES (v_lbl || ': table ' || rel);
    END LOOP;

    -- each person's events in the same order
    FOR rel IN SELECT jsonb_object_keys(v_es -> 'persons') UNION SELECT jsonb_object_keys(v_bs -> 'persons')
                ORDER BY 1 LOOP
        IF (v_es -> 'persons' -> rel) IS DISTINCT FROM (v_bs -> 'persons' -> rel) THEN
            RAISE EXCEPTION E'exec_batch_test: FAILED: %: events of person % differ (order or content)\n  one by one: %\n  exec_batch: %',
                v_lbl, rel, v_es -> 'persons' -> rel, v_bs -> 'persons' -> rel;
        END IF;
    END LOOP;
    INSERT INTO t.passed (label) VALUES (v_lbl || ': events of each person in order');
    INSERT INTO t.codes (code)
    SELECT DISTINCT e ->> 'code' FROM jsonb_array_elements(v_b) e ON CONFLICT DO NOTHING;
END
$$;

-- one transaction per batch
SELECT format('DO $x$ BEGIN PERFORM t.check_batch(%s); END $x$', b) FROM t.batches ORDER BY b
\gexec

-- ---------------------------------------------------------------- coverage

-- The generated commands reach every case the batches are meant to mix, and
-- the fast path answered a good share of the scans.
DO $$
DECLARE
    v_all jsonb := (SELECT jsonb_agg(e ORDER BY b, i)
                      FROM t.batches, jsonb_array_elements(cmds) WITH ORDINALITY AS x (e, i));
    v_codes text[];
BEGIN
    PERFORM t.ok((SELECT sum(jsonb_array_length(cmds)) FROM t.batches) >= 600,
                 'coverage: several hundred commands');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'verdict' = 'expired') > 0, 'coverage: expired tokens');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'verdict' = 'forged') > 0, 'coverage: forged tokens');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'verdict' = 'malformed') > 0, 'coverage: malformed tokens');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'kind' = 's') > 0, 'coverage: station scans');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'direction' IN ('DIRECTION_EXIT', '1')) > 0, 'coverage: exits');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' ->> 'device_id' = '') > 0, 'coverage: scans without a nonce');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE jsonb_typeof(e -> 'a' -> 'counter') = 'string'
                     AND (e -> 'a' ->> 'counter')::numeric > 9223372036854775807) > 0,
                 'coverage: counters above INT64_MAX as strings');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e
                   WHERE e -> 'a' -> 'scanned_at' = '0') > 0, 'coverage: scanned_at 0');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e WHERE e ->> 'n' = 'sign_up') > 0,
                 'coverage: sign_up between scans');
    PERFORM t.ok((SELECT count(*) FROM jsonb_array_elements(v_all) e WHERE e ->> 'n' = 'get_activity') > 0,
                 'coverage: get_activity between scans');
    SELECT array_agg(code ORDER BY code) INTO v_codes FROM t.codes;
    PERFORM t.ok(v_codes @> ARRAY['ok', 'not_signed_up', 'unknown_person', 'not_found',
                                  'already_checked_in', 'not_checked_in', 'wrong_activity',
                                  'token_expired', 'token_forged', 'token_malformed',
                                  'invalid_argument', 'idempotency_conflict'],
                 'coverage: every scan outcome (got ' || array_to_string(v_codes, ', ') || ')');
    PERFORM t.ok((SELECT sum(n) FROM t.fast) >= 150,
                 'coverage: the fast path answered many scans (' || (SELECT sum(n) FROM t.fast) || ')');
END
$$;

-- ---------------------------------------------------------------- misuse

-- The daemon always sends lanes that fit the batch: anything else is a
-- programming error, raised so the batch is rerun one command at a time,
-- and nothing is written.
CREATE FUNCTION t.raises(p_sql text, p_label text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint := (SELECT max(seq) FROM registry.outbox);
BEGIN
    BEGIN
        EXECUTE p_sql;
    EXCEPTION WHEN invalid_parameter_value THEN
        PERFORM t.eq((SELECT max(seq) FROM registry.outbox), v_seq, p_label || ': nothing written');
        RETURN;
    END;
    PERFORM t.ok(false, p_label || ': raised');
END
$$;

DO $$
BEGIN
    PERFORM t.raises('SELECT * FROM registry.exec_batch(''{}'')', 'misuse: not an array');
    PERFORM t.raises(format('SELECT * FROM registry.exec_batch(''[null, null]'', ''{k1}'', '
                            '''{%s}'', ''{t}'', ''{s}'', ''{%s}'', ''{%s}'', ''{%s}'', ''{d}'', '
                            '''{7}'', ''{%s}'', ''{0}'')', t.at(3), t.person(), t.id('W'),
                            t.comm('a', t.id('W')), t.at(3)),
                     'misuse: more lane commands than lane rows');
    PERFORM t.raises(format('SELECT * FROM registry.exec_batch(''[]'', ''{k1}'', '
                            '''{%s}'', ''{t}'', ''{s}'', ''{%s}'', ''{%s}'', ''{%s}'', ''{d}'', '
                            '''{7}'', ''{%s}'', ''{0}'')', t.at(3), t.person(), t.id('W'),
                            t.comm('a', t.id('W')), t.at(3)),
                     'misuse: more lane rows than lane commands');
    PERFORM t.raises(format('SELECT * FROM registry.exec_batch(''[null]'', ''{k1}'', '
                            '''{%s}'', ''{t}'', ''{s}'', ''{%s}'', ''{%s}'', ''{%s}'', ''{d,e}'', '
                            '''{7}'', ''{%s}'', ''{0}'')', t.at(3), t.person(), t.id('W'),
                            t.comm('a', t.id('W')), t.at(3)),
                     'misuse: lane columns of different lengths');
END
$$;

-- A run the fast path decides nothing of (here a person scanned twice, so
-- both scans are left to registry.exec) does not take the stream's turn: it
-- would hold it until commit, and the other batch in flight would wait.
-- Taking the turn locks the stream row, which marks it with our transaction.
DO $$
DECLARE
    n    integer;
    v_p  bigint := t.person();
BEGIN
    SELECT count(*) INTO n
      FROM registry.s_scan_lane(0, '{k-twice-1,k-twice-2}', ARRAY[t.at(3), t.at(3)],
                                '{t,t}', ARRAY[v_p, v_p],
                                ARRAY[t.id('W'), t.id('W')],
                                ARRAY[t.comm('a', t.id('W')), t.comm('a', t.id('W'))],
                                '{d-twice,d-twice}', '{1,2}', '{0,0}', '{0,0}')
     WHERE code IS NULL;
    PERFORM t.eq(n, 2, 'a person scanned twice in a run: both left to registry.exec');
    PERFORM t.ok((SELECT xmax::text FROM registry.outbox_stream WHERE stream = 'registry')
                 <> pg_current_xact_id()::text,
                 'a run that decides nothing takes no turn on the stream');
    SELECT count(*) INTO n
      FROM registry.s_scan_lane(0, '{k-once-1}', ARRAY[t.at(3)], '{t}', ARRAY[v_p],
                                ARRAY[t.id('W')], ARRAY[t.comm('a', t.id('W'))],
                                '{d-once}', '{1}', '{0}', '{0}')
     WHERE code IS NOT NULL;
    PERFORM t.eq(n, 1, 'a run of one scan: decided by the fast path');
    PERFORM t.ok((SELECT xmax::text FROM registry.outbox_stream WHERE stream = 'registry')
                 = pg_current_xact_id()::text,
                 'a run that writes events takes the turn');
END
$$;

\pset tuples_only on
\pset format unaligned
SELECT 'exec_batch_test: ' || count(*) || ' checks passed' FROM t.passed;
