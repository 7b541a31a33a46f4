-- Batched execution. The daemon sends a whole batch of commands as one
-- statement,
--     SELECT i, code, message, result FROM registry.exec_batch($1::jsonb)
-- where $1 is [{"n": name, "k": idempotency key, "a": args, "c": ctx}, ...],
-- and gets one row per command, i being its 0-based position in $1 (rows
-- come in no particular order), with what registry.exec would have answered
-- had the commands run one after another.
--
-- Check-ins are the flood (a festival gate scans thousands of people a
-- minute), so a run of 8 or more consecutive scan commands goes through
-- registry.s_scan_run, which handles the plain case, an entry scan of an
-- activity token, with one set-based statement instead of one function call
-- per scan. Everything else (exit scans, stations, refused tokens, retries,
-- malformed arguments, and any two scans of the run that touch the same
-- person, nonce or idempotency key) goes through registry.exec one by one
-- after that statement. A scan of the fast set shares no row with any other
-- command of the run, so the replies are those of running the run in order;
-- and it is the only scan of its person in the run, so each person's events
-- keep the order of the commands.

-- Runs p_cmds in order; see the header of this file. Like registry.exec
-- (see below) its plans always use the indexes.
CREATE FUNCTION registry.exec_batch(p_cmds jsonb)
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_n  integer;
    v_i  integer := 0;
    v_j  integer;
    c    jsonb;
    v_k  integer;
    r    registry.cmd_result;
    v_slow  integer[];
    v_fi    integer[];
    v_fc    text[];
    v_fm    text[];
    v_fr    text[];
BEGIN
    IF jsonb_typeof(p_cmds) IS DISTINCT FROM 'array' THEN
        -- the daemon always sends an array: this is a programming error
        RAISE EXCEPTION 'registry.exec_batch takes a JSON array' USING ERRCODE = '22023';
    END IF;
    v_n := jsonb_array_length(p_cmds);
    -- The stream's write turn first, before any command locks a row of its
    -- own: writers that take their locks in one order cannot deadlock.
    PERFORM registry.s_outbox_turn();
    WHILE v_i < v_n LOOP
        v_j := v_i;
        WHILE v_j < v_n AND p_cmds -> v_j ->> 'n' = 'scan' LOOP
            v_j := v_j + 1;
        END LOOP;
        IF v_j - v_i >= 8 THEN
            -- the fast statement's replies go out as they are; rows without
            -- a code are the scans it left, run here in command order
            SELECT array_agg(x.i ORDER BY x.i) FILTER (WHERE x.code IS NULL),
                   array_agg(x.i) FILTER (WHERE x.code IS NOT NULL),
                   array_agg(x.code) FILTER (WHERE x.code IS NOT NULL),
                   array_agg(x.message) FILTER (WHERE x.code IS NOT NULL),
                   array_agg(x.result) FILTER (WHERE x.code IS NOT NULL)
              INTO v_slow, v_fi, v_fc, v_fm, v_fr
              FROM registry.s_scan_run(
                       jsonb_path_query_array(p_cmds, format('$[%s to %s]', v_i, v_j - 1)::jsonpath),
                       v_i) x;
            RETURN QUERY SELECT * FROM unnest(v_fi, v_fc, v_fm, v_fr);
            FOREACH v_k IN ARRAY coalesce(v_slow, '{}') LOOP
                c := p_cmds -> v_k;
                r := registry.exec('scan', c ->> 'k', c -> 'a', c -> 'c');
                i := v_k;
                code := r.code;
                message := r.message;
                result := r.result::text;
                RETURN NEXT;
            END LOOP;
            v_i := v_j;
        ELSE
            c := p_cmds -> v_i;
            r := registry.exec(c ->> 'n', c ->> 'k', c -> 'a', c -> 'c');
            i := v_i;
            code := r.code;
            message := r.message;
            result := r.result::text;
            RETURN NEXT;
            v_i := v_i + 1;
        END IF;
    END LOOP;
END
$$;

-- A run of scan commands, p_run, the first of them at position p_first of
-- the batch: one row each, i its position in the batch. The fast set:
-- well-formed entry scans of a valid activity token whose person, nonce and
-- idempotency key appear once in the run and
-- were never seen before. They are decided, recorded (check-in, scan row,
-- event, idempotency record) and answered here exactly as
-- registry.cmd_scan would; every other scan gets a row with a NULL code, for
-- the caller to run through registry.exec after this statement.
--
-- The arguments are read with jsonb_to_record, and only a row whose values
-- have the JSON types registry.exec accepts can be fast. The daemon builds
-- them from protobuf, so a value jsonb_to_record cannot read (a number past
-- bigint in a bigint field) never comes; if one did, the statement would
-- raise and the daemon would rerun the batch one command at a time through
-- registry.exec, which answers invalid_argument.
CREATE FUNCTION registry.s_scan_run(p_run jsonb, p_first integer)
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
-- One plan for every batch (a custom plan per call would cost more than the
-- batch saves), and one that probes the unique indexes even when it was
-- made while the tables were empty: a cached plan outlives the statistics
-- it was made from, and a sequential scan per scan would grow with the
-- festival.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH parsed AS MATERIALIZED (
        SELECT (p_first + t.ord - 1)::integer AS i, coalesce(t.k, '') AS key,
               coalesce(t.c, '{}') AS ctx, jsonb_typeof(t.a) = 'object' AS is_obj,
               coalesce(a.verdict, '') AS verdict, coalesce(a.kind, '') AS kind,
               coalesce(a.subject_id, 0) AS subject, coalesce(a.community_id, 0) AS community,
               coalesce(a.person_id, 0) AS person, coalesce(a.device_id, '') AS device,
               CASE WHEN a.counter IS NULL THEN 0
                    WHEN a.counter < 0 OR a.counter > 18446744073709551615
                         OR a.counter <> trunc(a.counter) THEN NULL
                    WHEN a.counter > 9223372036854775807
                        THEN (a.counter - 18446744073709551616)::bigint
                    ELSE a.counter::bigint
               END AS counter,
               coalesce(a.scanned_at, 0) AS at, coalesce(a.expected_id, 0) AS expected,
               -- the JSON types registry.exec accepts (jsonb_to_record would
               -- also take "5" for a number): anything else is left to it
               coalesce(jsonb_typeof(t.a -> 'subject_id') = 'number', true)
                 AND coalesce(jsonb_typeof(t.a -> 'community_id') = 'number', true)
                 AND coalesce(jsonb_typeof(t.a -> 'person_id') = 'number', true)
                 AND coalesce(jsonb_typeof(t.a -> 'scanned_at') = 'number', true)
                 AND coalesce(jsonb_typeof(t.a -> 'expected_id') = 'number', true)
                 AND coalesce(jsonb_typeof(t.a -> 'device_id') = 'string', true)
                 AND (jsonb_typeof(t.a -> 'counter') IS DISTINCT FROM 'string'
                      OR t.a ->> 'counter' ~ '^[0-9]{1,20}$')
                 AND (t.a -> 'direction' IS NULL
                      OR t.a -> 'direction' IN ('null', '"DIRECTION_ENTRY"', '0')) AS canon
          FROM ROWS FROM (jsonb_to_recordset(p_run) AS (n text, k text, a jsonb, c jsonb))
               WITH ORDINALITY AS t (n, k, a, c, ord)
         CROSS JOIN LATERAL jsonb_to_record(CASE WHEN jsonb_typeof(t.a) = 'object'
                                                 THEN t.a ELSE '{}' END)
               AS a (verdict text, kind text, subject_id bigint, community_id bigint,
                     person_id bigint, device_id text, counter numeric, scanned_at bigint,
                     expected_id bigint)
    ), counted AS (
        -- over the whole run: a fast row shares nothing with any other row
        SELECT p.*,
               -- per person, not per (subject, person): a fast row's events
               -- are written before the slow rows', and must not overtake
               -- an earlier scan of the same person at another subject
               count(*) OVER (PARTITION BY p.person) AS n_person,
               count(*) OVER (PARTITION BY p.device, p.counter) AS n_nonce,
               count(*) OVER (PARTITION BY p.key) AS n_key
          FROM parsed p
    ), sorted AS MATERIALIZED (
        SELECT f.*,
               coalesce(f.is_obj AND f.verdict = 'ok' AND f.kind = 'a' AND f.subject > 0
                 AND f.person > 0 AND f.at >= 0
                 AND f.counter IS NOT NULL
                 AND (f.expected = 0 OR f.expected = f.subject)
                 AND f.canon
                 AND octet_length(f.device) <= 64 AND octet_length(f.key) <= 256
                 AND f.n_person = 1 AND (f.device = '' OR f.n_nonce = 1)
                 AND (f.key = '' OR f.n_key = 1), false) AS is_fast
          FROM counted f
    ), fast AS (
        SELECT f.*, registry.s_now(f.ctx) AS now FROM sorted f WHERE f.is_fast
    ), acts AS MATERIALIZED (
        -- each activity read once per run: its row is the one every sign-up
        -- updates, so a lookup per scan could walk a long chain of versions
        SELECT a.id, a.community_id, a.auto_checkout_at, a.walk_in
          FROM registry.activities a
         WHERE a.id IN (SELECT DISTINCT f.subject FROM fast f)
    ), looked AS MATERIALIZED (
        -- One unique-index probe per scan, whatever the statistics say about
        -- the tables' sizes: scalar subqueries, because the planner may turn
        -- an EXISTS into a hashed subplan that reads the whole index, once
        -- per batch but growing with the festival.
        SELECT f.*, a.community_id AS a_comm, a.auto_checkout_at AS auto, a.walk_in,
               a.id IS NOT NULL AS found,
               (SELECT true FROM registry.command_log l WHERE l.key = f.key) IS NOT NULL
                   AS key_seen,
               (SELECT true FROM registry.scans s
                 WHERE s.device_id = f.device AND s.counter = f.counter
                   AND s.device_id <> '') IS NOT NULL AS nonce_seen,
               (SELECT true FROM registry.people pp WHERE pp.id = f.person) IS NOT NULL
                   AS person_ok,
               (SELECT true FROM registry.signups u
                 WHERE u.activity_id = f.subject AND u.person_id = f.person
                   AND u.status = 'confirmed') IS NOT NULL AS signed,
               (SELECT ci.id FROM registry.checkins ci
                 WHERE ci.activity_id = f.subject AND ci.person_id = f.person
                   AND ci.checked_out_at IS NULL) AS open_id
          FROM fast f LEFT JOIN acts a ON a.id = f.subject
    ), decided AS (
        SELECT l.*,
               CASE WHEN NOT l.found THEN 'not_found'
                    WHEN NOT l.person_ok THEN 'unknown_person'
                    WHEN NOT (l.walk_in OR l.signed) THEN 'not_signed_up'
                    WHEN l.open_id IS NOT NULL THEN 'already_checked_in'
                    ELSE ''
               END AS reason,
               coalesce(l.a_comm, l.community) AS comm,
               CASE WHEN l.at = 0 THEN l.now ELSE l.at END AS at_ms
          FROM looked l
         WHERE NOT l.key_seen AND NOT l.nonce_seen
         ORDER BY l.i   -- check-in ids follow the commands' order
    ), res AS (
        -- the reply of registry.s_scan_reply for an activity entry scan,
        -- and the check-in's id taken here so no join is needed to find it
        SELECT d.*, v.checkin_id,
               CASE WHEN d.reason = '' THEN 'ok' ELSE d.reason END AS code,
               CASE WHEN d.reason = '' THEN 'Checked in.'
                    ELSE registry.s_scan_message(d.reason) END AS message,
               CASE WHEN d.reason = '' THEN
                        jsonb_build_object('accepted', true, 'checkin_id', v.checkin_id)
                    ELSE jsonb_build_object('accepted', false, 'reason', d.reason)
               END AS result
          FROM decided d
         CROSS JOIN LATERAL (
               SELECT CASE WHEN d.reason = '' THEN nextval('registry.checkins_id_seq')
                           ELSE 0 END AS checkin_id) v
    ), ins_checkin AS (
        INSERT INTO registry.checkins (id, community_id, activity_id, person_id, device_id,
                                       checked_in_at, auto_checkout_at)
        OVERRIDING SYSTEM VALUE
        SELECT x.checkin_id, x.comm, x.subject, x.person, x.device, x.at_ms, x.auto
          FROM res x WHERE x.reason = ''
    ), turn AS (
        SELECT registry.s_outbox_turn() AS last_seq
    ), ins_event AS (
        INSERT INTO registry.outbox (seq, type, community_id, trace_id, occurred_at, payload)
        SELECT t.last_seq + row_number() OVER (ORDER BY x.i),
               CASE WHEN x.reason = '' THEN 'checked_in' ELSE 'scan_refused' END,
               x.comm, coalesce(x.ctx ->> 'trace_id', ''), x.at_ms,
               CASE WHEN x.reason = '' THEN
                        jsonb_build_object('checkin_id', x.checkin_id, 'activity_id', x.subject,
                                           'person_id', x.person, 'community_id', x.comm,
                                           'at', x.at_ms, 'device_id', x.device)
                    ELSE
                        jsonb_build_object('activity_id', x.subject, 'person_id', x.person,
                                           'community_id', x.comm, 'reason', x.reason,
                                           'at', x.at_ms)
               END
          FROM res x CROSS JOIN turn t
    ), ins_scan AS (
        INSERT INTO registry.scans (device_id, counter, person_id, kind, subject_id, community_id,
                                    exit, expected_id, verdict, scanned_at, received_at,
                                    accepted, reason, checkin_id, stamps, stations)
        SELECT x.device, x.counter, x.person, 'a', x.subject, x.comm, false, x.expected, 'ok',
               x.at_ms, x.now, x.reason = '', x.reason, x.checkin_id, 0, 0
          FROM res x
    ), ins_log AS (
        INSERT INTO registry.command_log (key, command, code, message, result)
        SELECT x.key, 'scan', x.code, x.message, x.result FROM res x WHERE x.key <> ''
    )
    SELECT x.i, x.code, x.message, x.result::text FROM res x
    UNION ALL
    SELECT f.i, NULL, NULL, NULL FROM sorted f WHERE NOT f.is_fast
    UNION ALL
    SELECT l.i, NULL, NULL, NULL FROM looked l WHERE l.key_seen OR l.nonce_seen;
END
$$;

-- Every lookup in the command functions is by a key with an index. Their
-- plans are cached per connection and may have been made while a table was
-- empty; without this a plan that scans the whole table would be kept as the
-- table grows.
ALTER FUNCTION registry.exec(text, text, jsonb, jsonb) SET enable_seqscan = off;
