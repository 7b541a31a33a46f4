-- The timebank's movement lane against its definition.
--
-- timebank.exec_batch decides runs of gifts and spends sent in columns (the
-- lane, 003_lanes.sql) in one pass instead of calling timebank.exec per
-- command. This test generates a few hundred random commands (good and bad
-- amounts, unknown people, oneself, other communities, pools, gift
-- policies, limits, minimums held, keys repeated with the same and with
-- another command, commands without a key, queries in between), runs them
-- once through timebank.exec one by one and once as the daemon sends them,
-- in batches of several sizes, each run rolled back afterwards; and checks
-- that every reply, balance, entry (with its running balance), movement,
-- event and idempotency record is the same. The last line printed is
-- "timebank_lane_test: N checks passed".

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

SET t.name = 'timebank_lane_test';
\ir lib/t.sql

CREATE FUNCTION t.ev(p_seq bigint, p_type text, p_payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r timebank.cmd_result;
BEGIN
    r := timebank.exec('apply_events', '', jsonb_build_object('stream', 'registry', 'epoch', 1,
             'first', p_seq, 'last', p_seq, 'events', jsonb_build_array(jsonb_build_object(
                 'seq', p_seq, 'type', p_type, 'at', 1783094400000, 'p', p_payload))),
             '{"now": 1783094400000}');
    PERFORM t.eq(r.code, 'ok', 'event ' || p_seq);
END
$$;

CREATE FUNCTION t.must(p_name text, p_args jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r timebank.cmd_result;
BEGIN
    r := timebank.exec(p_name, '', p_args, '{"now": 1783180800000}');
    IF r.code <> 'ok' THEN
        RAISE EXCEPTION 'timebank_lane_test: setup % failed: % %', p_name, r.code, r.message;
    END IF;
    RETURN r.result;
END
$$;

-- Two communities of 12 people (organisers 1 and 13), everyone credited;
-- 江翠 (1) lets members overdraw 30 minutes, 新中 (2) wants 20 held before
-- a spend and gifts only within the community; a family link 3 <-> 15.
DO $$
DECLARE
    s    bigint := 0;
    res  jsonb;
    p    integer;
BEGIN
    s := s + 1; PERFORM t.ev(s, 'community_created', '{"id": 1, "name": "江翠社区"}');
    s := s + 1; PERFORM t.ev(s, 'community_created', '{"id": 2, "name": "新中社区"}');
    FOR p IN 1 .. 24 LOOP
        s := s + 1;
        PERFORM t.ev(s, 'person_registered', jsonb_build_object('id', p,
                     'community_id', CASE WHEN p <= 12 THEN 1 ELSE 2 END,
                     'roles', CASE WHEN p IN (1, 13) THEN '["ROLE_ORGANISER"]'::jsonb
                                   ELSE '["ROLE_VOLUNTEER"]'::jsonb END));
    END LOOP;
    FOR p IN 2 .. 24 LOOP
        CONTINUE WHEN p = 13;
        res := t.must('record_hours', jsonb_build_object('actor_id', CASE WHEN p <= 12 THEN 1 ELSE 13 END,
                      'person_id', p, 'minutes', 30 + 7 * p, 'started_at', 1783100000000));
        PERFORM t.must('approve_hours', jsonb_build_object('actor_id', CASE WHEN p <= 12 THEN 1 ELSE 13 END,
                       'record_id', res -> 'record_id'));
    END LOOP;
    PERFORM t.must('set_rules', jsonb_build_object('actor_id', 1, 'reason', 'test',
        'rules', (SELECT timebank.s_rules_json(r) FROM timebank.rules r WHERE community_id = 1)
                 || '{"overdraft_minutes": 30}'));
    PERFORM t.must('set_rules', jsonb_build_object('actor_id', 13, 'reason', 'test',
        'rules', (SELECT timebank.s_rules_json(r) FROM timebank.rules r WHERE community_id = 2)
                 || '{"min_held_minutes": 20, "gift_policy": "community"}'));
    PERFORM t.must('link_family', '{"actor_id": 3, "person_id": 3, "relative_id": 15, "relation": "parent"}');
END
$$;

-- the commands: n, name, key, args, whether the daemon would use the lane
CREATE TABLE t.cmds (n integer PRIMARY KEY, name text, key text, args jsonb, lane boolean,
                     now bigint);

DO $$
#variable_conflict use_variable
DECLARE
    n     integer;
    x     float8;
    a     integer;
    b     integer;
    m     bigint;
    name  text;
    args  jsonb;
    key   text;
BEGIN
    PERFORM setseed(0.42);
    FOR n IN 1 .. 600 LOOP
        x := random();
        a := 1 + floor(random() * 24)::integer;
        b := 1 + floor(random() * 24)::integer;
        m := CASE WHEN random() < 0.03 THEN 0
                  WHEN random() < 0.02 THEN 60000001
                  ELSE 1 + floor(random() * 40)::bigint END;
        IF random() < 0.02 THEN a := 99; END IF;      -- nobody
        IF random() < 0.02 THEN b := a; END IF;       -- oneself
        IF x < 0.45 THEN
            name := 'gift';
            args := jsonb_build_object('from_person_id', a, 'to_person_id', b, 'minutes', m,
                                       'memo', CASE WHEN random() < 0.02 THEN repeat('m', 201)
                                                    ELSE 'gift ' || n END);
        ELSIF x < 0.92 THEN
            name := 'spend';
            args := jsonb_build_object('person_id', a, 'minutes', m,
                        'service', CASE WHEN random() < 0.02 THEN '' ELSE 'elderly care' END,
                        'memo', CASE WHEN random() < 0.5 THEN '' ELSE 'visit ' || n END);
            IF random() < 0.5 THEN
                args := args || jsonb_build_object('provider_id', b);
            ELSIF random() < 0.5 THEN
                args := args || jsonb_build_object('community_id',
                            (ARRAY[1, 2, 7])[1 + floor(random() * 3)::integer]);
            END IF;
        ELSIF x < 0.96 THEN
            name := 'get_balance';
            args := jsonb_build_object('person_id', a);
        ELSE
            name := 'record_hours';
            args := jsonb_build_object('actor_id', 1, 'person_id', a, 'minutes', 30,
                                       'started_at', 1783100000000 + n * 60000);
        END IF;
        key := CASE WHEN random() < 0.1 THEN '' ELSE 'c' || n END;
        IF n > 20 AND random() < 0.05 THEN
            -- a retry: an earlier command again, with its key
            a := n - 1 - floor(random() * 15)::integer;
            SELECT c.name, c.key, c.args INTO STRICT name, key, args FROM t.cmds c WHERE c.n = a;
        ELSIF n > 20 AND random() < 0.02 THEN
            -- an earlier key on another command
            SELECT c.key INTO STRICT key FROM t.cmds c WHERE c.n = n - 3;
        END IF;
        INSERT INTO t.cmds VALUES (n, name, key, args, name IN ('gift', 'spend'),
                                   1783200000000 + n * 1000);
    END LOOP;
END
$$;

-- Everything the commands may have changed, with movement ids left out
-- (the two runs draw them from one sequence).
CREATE FUNCTION t.snapshot(p_after bigint) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'balances', (SELECT jsonb_object_agg(id, balance) FROM timebank.accounts),
        'runs', (SELECT jsonb_object_agg(account_id, run) FROM (
                    SELECT account_id, jsonb_agg(jsonb_build_array(amount, balance, at) ORDER BY id) AS run
                      FROM timebank.entries WHERE transfer_id > p_after GROUP BY account_id) x),
        'transfers', (SELECT jsonb_agg(jsonb_build_array(coalesce(command_key, ''), kind, at,
                                           minutes, from_account, to_account, actor_id, memo)
                                       ORDER BY coalesce(command_key, ''), at, from_account)
                        FROM timebank.transfers WHERE id > p_after),
        'legs', (SELECT jsonb_agg(jsonb_build_array(coalesce(t.command_key, ''), t.at,
                                      e.account_id, e.amount)
                                  ORDER BY coalesce(t.command_key, ''), t.at, e.account_id, e.amount)
                   FROM timebank.entries e JOIN timebank.transfers t ON t.id = e.transfer_id
                  WHERE t.id > p_after),
        'events', (SELECT jsonb_agg(jsonb_build_array(type, community_id, trace_id, occurred_at,
                                        payload::jsonb - 'transfer_id' - 'record_id')
                                    ORDER BY type, occurred_at, payload::text)
                     FROM timebank.outbox o
                    WHERE o.seq > (SELECT max(seq) FROM timebank.outbox WHERE occurred_at < 1783200000000)),
        'log', (SELECT jsonb_agg(jsonb_build_array(key, command, code, message,
                                     result::jsonb - 'transfer_id' - 'record_id') ORDER BY key)
                  FROM timebank.command_log),
        'records', (SELECT count(*) FROM timebank.records))
$$;

CREATE FUNCTION t.ctx(c t.cmds) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('now', c.now, 'trace_id', 'tr' || c.n, 'source', 'lane-test')
$$;

-- one by one through timebank.exec: n -> [code, message, result]
CREATE FUNCTION t.run_exec() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c    t.cmds;
    r    timebank.cmd_result;
    out  jsonb := '{}';
BEGIN
    FOR c IN SELECT * FROM t.cmds ORDER BY n LOOP
        r := timebank.exec(c.name, c.key, c.args, t.ctx(c));
        out := out || jsonb_build_object(c.n::text,
                   jsonb_build_array(r.code, r.message, r.result - 'transfer_id' - 'record_id'));
    END LOOP;
    RETURN out;
END
$$;

-- as the daemon sends them, p_size commands per batch
CREATE FUNCTION t.run_batches(p_size integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_first  integer := 1;
    v_last   integer;
    v_max    integer := (SELECT max(n) FROM t.cmds);
    x        record;
    out      jsonb := '{}';
BEGIN
    WHILE v_first <= v_max LOOP
        v_last := least(v_first + p_size - 1, v_max);
        FOR x IN
            WITH b AS (SELECT * FROM t.cmds WHERE n BETWEEN v_first AND v_last),
                 l AS (SELECT * FROM b WHERE lane ORDER BY n)
            SELECT r.i, r.code, r.message, r.result
              FROM timebank.exec_batch(
                       (SELECT jsonb_agg(CASE WHEN b.lane THEN 'null'::jsonb
                                              ELSE jsonb_build_object('n', b.name, 'k', b.key,
                                                       'a', b.args, 'c', t.ctx(b)) END
                                         ORDER BY b.n) FROM b),
                       (SELECT coalesce(array_agg(l.key ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg(l.now ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg('tr' || l.n ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg('lane-test'::text ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg(l.name ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg(coalesce((l.args ->> 'from_person_id')::bigint,
                                                           (l.args ->> 'person_id')::bigint)
                                                  ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg(coalesce((l.args ->> 'to_person_id')::bigint,
                                                           (l.args ->> 'provider_id')::bigint, 0)
                                                  ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg(coalesce((l.args ->> 'community_id')::bigint, 0)
                                                  ORDER BY l.n), '{}') FROM l),
                       (SELECT coalesce(array_agg((l.args ->> 'minutes')::bigint ORDER BY l.n), '{}')
                          FROM l),
                       (SELECT coalesce(array_agg(coalesce(l.args ->> 'service', '') ORDER BY l.n), '{}')
                          FROM l),
                       (SELECT coalesce(array_agg(coalesce(l.args ->> 'memo', '') ORDER BY l.n), '{}')
                          FROM l)) r
        LOOP
            out := out || jsonb_build_object((v_first + x.i)::text,
                       jsonb_build_array(x.code, x.message, x.result::jsonb - 'transfer_id' - 'record_id'));
        END LOOP;
        v_first := v_last + 1;
    END LOOP;
    RETURN out;
END
$$;

DO $$
DECLARE
    v_base  bigint := (SELECT max(id) FROM timebank.transfers);
    a       jsonb;
    sa      jsonb;
    b       jsonb;
    sb      jsonb;
    v_size  integer;
    k       text;
    v_lane  integer;
BEGIN
    BEGIN
        a := t.run_exec();
        sa := t.snapshot(v_base);
        RAISE EXCEPTION USING ERRCODE = 'T0001';
    EXCEPTION WHEN SQLSTATE 'T0001' THEN NULL;
    END;
    PERFORM t.ok((SELECT count(*) FROM jsonb_each(a) e WHERE e.value ->> 0 = 'ok') > 200,
                 'the commands moved hours');
    PERFORM t.ok((SELECT count(DISTINCT e.value ->> 0) FROM jsonb_each(a) e) >= 8,
                 'the commands met many answers: '
                 || (SELECT string_agg(DISTINCT e.value ->> 0, ' ') FROM jsonb_each(a) e));
    FOREACH v_size IN ARRAY ARRAY[1, 7, 50, 600] LOOP
        BEGIN
            v_base := (SELECT last_value FROM timebank.transfers_id_seq);
            b := t.run_batches(v_size);
            sb := t.snapshot(v_base);
            RAISE EXCEPTION USING ERRCODE = 'T0001';
        EXCEPTION WHEN SQLSTATE 'T0001' THEN NULL;
        END;
        FOR k IN SELECT jsonb_object_keys(a) LOOP
            PERFORM t.eq(b -> k, a -> k, format('batches of %s: command %s', v_size, k));
        END LOOP;
        PERFORM t.eq(sb -> 'balances', sa -> 'balances', format('batches of %s: balances', v_size));
        PERFORM t.eq(sb -> 'runs', sa -> 'runs',
                     format('batches of %s: every account''s entries and running balance', v_size));
        PERFORM t.eq(sb -> 'transfers', sa -> 'transfers', format('batches of %s: movements', v_size));
        PERFORM t.eq(sb -> 'legs', sa -> 'legs', format('batches of %s: legs', v_size));
        PERFORM t.eq(sb -> 'events', sa -> 'events', format('batches of %s: events', v_size));
        PERFORM t.eq(sb -> 'log', sa -> 'log', format('batches of %s: idempotency records', v_size));
        PERFORM t.eq(sb -> 'records', sa -> 'records', format('batches of %s: records', v_size));
    END LOOP;
END
$$;

-- The pass decides plain commands itself (none left to timebank.exec).
DO $$
DECLARE
    v_left  integer;
    v_ok    integer;
BEGIN
    SELECT count(*) FILTER (WHERE code IS NULL), count(*) FILTER (WHERE code = 'ok')
      INTO v_left, v_ok
      FROM timebank.s_move_lane(0, '{p1,p2,p3,p4,""}', '{1,1,1,1,1}', '{a,b,c,d,e}',
               '{gift,spend,spend,gift,spend}', '{2,3,14,4,5}', '{3,0,0,16,6}', '{0,0,1,0,0}',
               '{5,5,5,5,500}', '{"",repair,repair,"",lessons}', '{"","","","",""}');
    PERFORM t.eq(v_left, 0, 'plain commands: all decided in the pass');
    PERFORM t.eq(v_ok, 4, 'plain commands: four moved, one refused');
    PERFORM t.eq((SELECT count(*) FROM timebank.entries e JOIN timebank.transfers t
                   ON t.id = e.transfer_id WHERE t.command_key = 'p3'), 4::bigint,
                 'a spend at another community''s pool: four legs');
    PERFORM t.eq((SELECT code FROM timebank.command_log WHERE key = 'p4'), 'ok',
                 'a gift across communities under the payer''s rules');
    -- misuse by a caller other than the daemon is an error, not a guess
    BEGIN
        PERFORM * FROM timebank.exec_batch('[null]', '{k}', '{1}', '{t}', '{s}', '{gift}', '{2}',
                                           '{3}', '{0}', '{5}', '{""}', '{}');
        RAISE EXCEPTION 'timebank_lane_test: FAILED: lanes of different lengths accepted';
    EXCEPTION WHEN SQLSTATE '22023' THEN
        PERFORM t.ok(true, 'lanes of different lengths refused');
    END;
    BEGIN
        PERFORM * FROM timebank.exec_batch('[null, null]', '{k}', '{1}', '{t}', '{s}', '{gift}',
                                           '{2}', '{3}', '{0}', '{5}', '{""}', '{""}');
        RAISE EXCEPTION 'timebank_lane_test: FAILED: more nulls than lane rows accepted';
    EXCEPTION WHEN SQLSTATE '22023' THEN
        PERFORM t.ok(true, 'more lane commands than rows refused');
    END;
END
$$;

\pset tuples_only on
\pset format unaligned
SELECT 'timebank_lane_test: ' || count(*) || ' checks passed' FROM t.passed;
