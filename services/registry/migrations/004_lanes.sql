-- Entry scans in columns.
--
-- Check-ins are the flood: a festival gate scans thousands of people a
-- minute. Parsing each scan's JSON into jsonb and building each reply and
-- event with jsonb_build_object cost more than writing its rows, so the
-- daemon now sends the plain case, an entry scan of a verified activity
-- token, as a row of typed columns (its "lane", see common/sqlcmd.h), and
-- the batch statement becomes
--     SELECT i, code, message, result
--       FROM registry.exec_batch($1::jsonb, $2::text[], ..., $12::bigint[])
-- where a lane command stands in $1 as a JSON null, and the k-th null of $1
-- is row k of the arrays: idempotency key, ctx now, trace id, source (every
-- lane has these four), then person, activity, its community (from the
-- token), device, counter (uint64 stored two's-complement), scanned_at
-- (already resolved to now when the scanner sent none) and expected_id.
--
-- Events are stored as json text rather than jsonb: they are written once
-- and read once, as text, by the relay; jsonb would parse each on the way in
-- and print it on the way out.

ALTER TABLE registry.outbox ALTER COLUMN payload TYPE json USING payload::json;

DROP FUNCTION registry.exec_batch(jsonb);
DROP FUNCTION registry.s_scan_run(jsonb, integer);

-- A run of lane scans, the first of them at position p_first of the batch:
-- one row each, i its position in the batch. The fast set: scans whose
-- person, nonce and idempotency key appear once in the run and were never
-- seen before. They are decided, recorded (check-in, scan row, event,
-- idempotency record) and answered here exactly as registry.cmd_scan would;
-- every other scan gets a row with a NULL code, for the caller to run
-- through registry.exec after this statement. A scan of the fast set shares
-- no row with any other command of the run, so the replies are those of
-- running the run in order; and it is the only scan of its person in the
-- run, so each person's events keep the order of the commands.
CREATE FUNCTION registry.s_scan_lane(p_first integer, p_key text[], p_now bigint[],
                                     p_trace text[], p_person bigint[], p_subject bigint[],
                                     p_community bigint[], p_device text[], p_counter bigint[],
                                     p_at bigint[], p_expected bigint[])
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
-- One plan for every batch (a custom plan per call would cost more than the
-- batch saves), and one that probes the unique indexes even when it was
-- made while the tables were empty: a cached plan outlives the statistics
-- it was made from.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_dup_person  bigint[];
    v_dup_nonce   text[];
    v_dup_key     text[];
BEGIN
    -- What appears more than once in the run (usually nothing): a fast row
    -- shares nothing with any other row. Per person, not per (activity,
    -- person): a fast row's events are written before the slow rows', and
    -- must not overtake an earlier scan of the same person elsewhere.
    v_dup_person := ARRAY(SELECT x FROM unnest(p_person) x WHERE x IS NOT NULL
                           GROUP BY x HAVING count(*) > 1);
    v_dup_nonce := ARRAY(SELECT c || ' ' || d FROM unnest(p_device, p_counter) AS u (d, c)
                          WHERE d <> '' GROUP BY d, c HAVING count(*) > 1);
    v_dup_key := ARRAY(SELECT k FROM unnest(p_key) k WHERE k <> ''
                        GROUP BY k HAVING count(*) > 1);
    RETURN QUERY
    WITH lane AS (
        SELECT (p_first + t.ord - 1)::integer AS i, coalesce(t.key, '') AS key, t.now,
               coalesce(t.trace, '') AS trace, t.person, t.subject, t.community,
               t.device, t.counter, t.at, t.expected
          FROM unnest(p_key, p_now, p_trace, p_person, p_subject, p_community, p_device,
                      p_counter, p_at, p_expected)
               WITH ORDINALITY AS t (key, now, trace, person, subject, community, device,
                                     counter, at, expected, ord)
    ), sorted AS MATERIALIZED (
        -- the daemon sends only valid rows; anything else is left to
        -- registry.exec, which answers it
        SELECT l.*,
               coalesce(l.subject > 0 AND l.person > 0 AND l.community >= 0 AND l.at >= 0
                 AND l.now IS NOT NULL AND l.counter IS NOT NULL
                 AND (l.expected = 0 OR l.expected = l.subject)
                 AND octet_length(l.device) <= 64 AND octet_length(l.key) <= 256
                 AND l.person <> ALL (v_dup_person)
                 AND (l.device = '' OR l.counter || ' ' || l.device <> ALL (v_dup_nonce))
                 AND (l.key = '' OR l.key <> ALL (v_dup_key)), false) AS is_fast
          FROM lane l
    ), acts AS MATERIALIZED (
        -- each activity read once per run: its row is the one every sign-up
        -- updates, so a lookup per scan could walk a long chain of versions
        SELECT a.id, a.community_id, a.auto_checkout_at, a.walk_in
          FROM registry.activities a
         WHERE a.id IN (SELECT DISTINCT f.subject FROM sorted f WHERE f.is_fast)
    ), looked AS MATERIALIZED (
        -- One unique-index probe per lookup, whatever the statistics say
        -- about the tables' sizes: scalar subqueries, because the planner
        -- may turn an EXISTS into a hashed subplan that reads the whole
        -- index. A confirmed sign-up implies the person exists (sign_up
        -- checks, and people are never deleted), so only walk-ins need the
        -- person looked up.
        SELECT f.*, a.community_id AS a_comm, a.auto_checkout_at AS auto, a.walk_in,
               a.id IS NOT NULL AS found,
               f.key <> '' AND (SELECT true FROM registry.command_log l
                                 WHERE l.key = f.key) IS NOT NULL AS key_seen,
               f.device <> '' AND (SELECT true FROM registry.scans s
                                    WHERE s.device_id = f.device AND s.counter = f.counter
                                      AND s.device_id <> '') IS NOT NULL AS nonce_seen,
               (SELECT true FROM registry.signups u
                 WHERE u.activity_id = f.subject AND u.person_id = f.person
                   AND u.status = 'confirmed') IS NOT NULL AS signed,
               (SELECT ci.id FROM registry.checkins ci
                 WHERE ci.activity_id = f.subject AND ci.person_id = f.person
                   AND ci.checked_out_at IS NULL) AS open_id
          FROM sorted f LEFT JOIN acts a ON a.id = f.subject
         WHERE f.is_fast
    ), decided AS (
        SELECT l.*,
               CASE WHEN NOT l.found THEN 'not_found'
                    WHEN NOT l.signed
                         AND (SELECT true FROM registry.people pp
                               WHERE pp.id = l.person) IS NULL THEN 'unknown_person'
                    WHEN NOT (l.walk_in OR l.signed) THEN 'not_signed_up'
                    WHEN l.open_id IS NOT NULL THEN 'already_checked_in'
                    ELSE ''
               END AS reason,
               coalesce(l.a_comm, l.community) AS comm,
               CASE WHEN l.at = 0 THEN l.now ELSE l.at END AS at_ms
          FROM looked l
         WHERE NOT l.key_seen AND NOT l.nonce_seen
         ORDER BY l.i   -- check-in ids follow the commands' order
    ), res AS MATERIALIZED (
        -- the reply of registry.s_scan_reply for an activity entry scan, as
        -- text, and the check-in's id taken here so no join is needed
        SELECT d.*, v.checkin_id,
               row_number() OVER (ORDER BY d.i) AS nth,
               CASE WHEN d.reason = '' THEN 'ok' ELSE d.reason END AS code,
               CASE WHEN d.reason = '' THEN 'Checked in.'
                    ELSE registry.s_scan_message(d.reason) END AS message,
               CASE WHEN d.reason = '' THEN
                        '{"accepted": true, "checkin_id": ' || v.checkin_id || '}'
                    ELSE '{"accepted": false, "reason": "' || d.reason || '"}'
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
        -- the stream's write turn: in a batch of lane scans only, taken
        -- here, after the reading and checking (see registry.exec_batch)
        SELECT registry.s_outbox_turn() AS last_seq
    ), ins_event AS (
        -- the payloads of registry.cmd_scan's events, field for field
        INSERT INTO registry.outbox (seq, type, community_id, trace_id, occurred_at, payload)
        SELECT t.last_seq + x.nth,
               CASE WHEN x.reason = '' THEN 'checked_in' ELSE 'scan_refused' END,
               x.comm, x.trace, x.at_ms,
               CASE WHEN x.reason = '' THEN
                        '{"checkin_id": ' || x.checkin_id || ', "activity_id": ' || x.subject
                        || ', "person_id": ' || x.person || ', "community_id": ' || x.comm
                        || ', "at": ' || x.at_ms || ', "device_id": ' || to_json(x.device)
                        || '}'
                    ELSE
                        '{"activity_id": ' || x.subject || ', "person_id": ' || x.person
                        || ', "community_id": ' || x.comm || ', "reason": "' || x.reason
                        || '", "at": ' || x.at_ms || '}'
               END::json
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
        SELECT x.key, 'scan', x.code, x.message, x.result::jsonb FROM res x WHERE x.key <> ''
    )
    SELECT x.i, x.code, x.message, x.result FROM res x
    UNION ALL
    SELECT f.i, NULL, NULL, NULL FROM sorted f WHERE NOT f.is_fast
    UNION ALL
    SELECT l.i, NULL, NULL, NULL FROM looked l WHERE l.key_seen OR l.nonce_seen;
END
$$;

-- Runs the batch in order (see the top of this file): each JSON command
-- through registry.exec, each run of lane scans through registry.s_scan_lane
-- and then, one by one, the scans it left. Returns one row per command, i
-- its 0-based position in p_cmds, in no particular order. Like
-- registry.exec its plans always use the indexes.
CREATE FUNCTION registry.exec_batch(p_cmds jsonb,
                                    p_key text[] DEFAULT '{}', p_now bigint[] DEFAULT '{}',
                                    p_trace text[] DEFAULT '{}', p_source text[] DEFAULT '{}',
                                    p_person bigint[] DEFAULT '{}',
                                    p_subject bigint[] DEFAULT '{}',
                                    p_community bigint[] DEFAULT '{}',
                                    p_device text[] DEFAULT '{}',
                                    p_counter bigint[] DEFAULT '{}',
                                    p_at bigint[] DEFAULT '{}',
                                    p_expected bigint[] DEFAULT '{}')
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_n     integer;
    v_rows  integer := coalesce(cardinality(p_key), 0);
    v_i     integer := 0;
    v_j     integer;
    v_f     integer := 0;   -- lane rows used so far
    v_k     integer;
    v_r     integer;
    c       jsonb;
    r       registry.cmd_result;
    v_slow  integer[];
    v_fi    integer[];
    v_fc    text[];
    v_fm    text[];
    v_fr    text[];
BEGIN
    -- the daemon always sends an array and lanes of one length: anything
    -- else is a programming error
    IF jsonb_typeof(p_cmds) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'registry.exec_batch takes a JSON array' USING ERRCODE = '22023';
    END IF;
    IF v_rows <> coalesce(cardinality(p_now), 0) OR v_rows <> coalesce(cardinality(p_trace), 0)
       OR v_rows <> coalesce(cardinality(p_source), 0)
       OR v_rows <> coalesce(cardinality(p_person), 0)
       OR v_rows <> coalesce(cardinality(p_subject), 0)
       OR v_rows <> coalesce(cardinality(p_community), 0)
       OR v_rows <> coalesce(cardinality(p_device), 0)
       OR v_rows <> coalesce(cardinality(p_counter), 0)
       OR v_rows <> coalesce(cardinality(p_at), 0)
       OR v_rows <> coalesce(cardinality(p_expected), 0) THEN
        RAISE EXCEPTION 'registry.exec_batch: lane columns differ in length' USING ERRCODE = '22023';
    END IF;
    v_n := jsonb_array_length(p_cmds);
    -- The stream's write turn first, before any command locks a row of its
    -- own: writers that take their locks in one order cannot deadlock. A
    -- batch of lane scans only takes it late, when it writes its events,
    -- so that two such batches (the daemon runs two at once) do their
    -- reading and checking at the same time: they lock no row, and the
    -- unique indexes on open check-ins, nonces and keys settle any conflict
    -- between them by aborting one (which the daemon reruns one command at
    -- a time).
    IF v_rows < v_n THEN
        PERFORM registry.s_outbox_turn();
    END IF;
    WHILE v_i < v_n LOOP
        c := p_cmds -> v_i;
        IF jsonb_typeof(c) <> 'null' THEN
            r := registry.exec(c ->> 'n', c ->> 'k', c -> 'a', c -> 'c');
            i := v_i;
            code := r.code;
            message := r.message;
            result := r.result::text;
            RETURN NEXT;
            v_i := v_i + 1;
            CONTINUE;
        END IF;
        v_j := v_i + 1;
        WHILE v_j < v_n AND jsonb_typeof(p_cmds -> v_j) = 'null' LOOP
            v_j := v_j + 1;
        END LOOP;
        IF v_f + (v_j - v_i) > v_rows THEN
            RAISE EXCEPTION 'registry.exec_batch: more lane commands than lane rows'
                USING ERRCODE = '22023';
        END IF;
        -- the fast statement's replies go out as they are; rows without a
        -- code are the scans it left, run here in command order
        SELECT array_agg(x.i ORDER BY x.i) FILTER (WHERE x.code IS NULL),
               array_agg(x.i) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.code) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.message) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.result) FILTER (WHERE x.code IS NOT NULL)
          INTO v_slow, v_fi, v_fc, v_fm, v_fr
          FROM registry.s_scan_lane(v_i,
                   p_key[v_f + 1 : v_f + v_j - v_i], p_now[v_f + 1 : v_f + v_j - v_i],
                   p_trace[v_f + 1 : v_f + v_j - v_i], p_person[v_f + 1 : v_f + v_j - v_i],
                   p_subject[v_f + 1 : v_f + v_j - v_i],
                   p_community[v_f + 1 : v_f + v_j - v_i],
                   p_device[v_f + 1 : v_f + v_j - v_i], p_counter[v_f + 1 : v_f + v_j - v_i],
                   p_at[v_f + 1 : v_f + v_j - v_i], p_expected[v_f + 1 : v_f + v_j - v_i]) x;
        RETURN QUERY SELECT * FROM unnest(v_fi, v_fc, v_fm, v_fr);
        FOREACH v_k IN ARRAY coalesce(v_slow, '{}') LOOP
            -- the arguments and ctx the daemon would have sent as JSON
            v_r := v_f + (v_k - v_i) + 1;
            r := registry.exec('scan', p_key[v_r],
                     jsonb_build_object('verdict', 'ok', 'kind', 'a',
                         'subject_id', p_subject[v_r], 'community_id', p_community[v_r],
                         'person_id', p_person[v_r], 'device_id', p_device[v_r],
                         'counter', CASE WHEN p_counter[v_r] < 0
                                         THEN p_counter[v_r] + 18446744073709551616
                                         ELSE p_counter[v_r] END,
                         'scanned_at', p_at[v_r], 'expected_id', p_expected[v_r]),
                     jsonb_build_object('now', p_now[v_r], 'trace_id', p_trace[v_r],
                                        'source', p_source[v_r]));
            i := v_k;
            code := r.code;
            message := r.message;
            result := r.result::text;
            RETURN NEXT;
        END LOOP;
        v_f := v_f + (v_j - v_i);
        v_i := v_j;
    END LOOP;
    IF v_f <> v_rows THEN
        RAISE EXCEPTION 'registry.exec_batch: more lane rows than lane commands'
            USING ERRCODE = '22023';
    END IF;
END
$$;
