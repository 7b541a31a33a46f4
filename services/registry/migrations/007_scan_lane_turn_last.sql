-- The scan lane takes the stream's write turn last.
--
-- The data-modifying parts of one statement run in the reverse order of
-- their WITH clauses, so in 006_scan_lane_one_pass.sql the check-in rows
-- were written after the turn was taken (registry.s_outbox_turn locks the
-- stream row until commit). Two lane batches run at once (see
-- registry.exec_batch), and a batch waiting for the turn waits for the other
-- to commit: everything written after the turn is written one batch at a
-- time. Now the idempotency records, the scan rows and the check-ins are
-- written first, beside the other batch, and the turn is taken for the
-- events alone. Replies, rows and events are those of 006. PostgreSQL does
-- not promise that order (it is how its executor finishes a statement's
-- data-modifying parts); were it to change, the overlap would be lost,
-- nothing else: the turn is still taken before the events are numbered.

CREATE OR REPLACE FUNCTION registry.s_scan_lane(p_first integer, p_key text[],
                                                p_now bigint[], p_trace text[],
                                                p_person bigint[], p_subject bigint[],
                                                p_community bigint[], p_device text[],
                                                p_counter bigint[], p_at bigint[],
                                                p_expected bigint[])
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
-- one plan for every batch, and one that probes the unique indexes even when
-- it was made while the tables were empty (see 004_lanes.sql)
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
    -- shares nothing with any other row (see 004_lanes.sql).
    v_dup_person := ARRAY(SELECT x FROM unnest(p_person) x WHERE x IS NOT NULL
                           GROUP BY x HAVING count(*) > 1);
    v_dup_nonce := ARRAY(SELECT c || ' ' || d FROM unnest(p_device, p_counter) AS u (d, c)
                          WHERE d <> '' GROUP BY d, c HAVING count(*) > 1);
    v_dup_key := ARRAY(SELECT k FROM unnest(p_key) k WHERE k <> ''
                        GROUP BY k HAVING count(*) > 1);
    RETURN QUERY
    WITH acts AS MATERIALIZED (
        -- each activity read once per run: its row is the one every sign-up
        -- updates, so a lookup per scan could walk a long chain of versions
        SELECT a.id, a.community_id, a.auto_checkout_at, a.walk_in
          FROM registry.activities a
         WHERE a.id = ANY (p_subject)
    ), res AS MATERIALIZED (
        -- one row per scan of the run: decided (the fast path answers it,
        -- reason '' when accepted, with the reply of registry.s_scan_reply
        -- for an activity entry scan) or not (registry.exec_batch runs it
        -- through registry.exec); check-in ids and event numbers follow the
        -- commands' order
        SELECT v.*,
               CASE WHEN NOT v.decided THEN NULL
                    WHEN v.reason = '' THEN 'ok' ELSE v.reason END AS code,
               CASE WHEN NOT v.decided THEN NULL
                    WHEN v.reason = '' THEN 'Checked in.'
                    ELSE registry.s_scan_message(v.reason) END AS message,
               CASE WHEN NOT v.decided THEN NULL
                    WHEN v.reason = '' THEN
                        '{"accepted": true, "checkin_id": ' || v.checkin_id || '}'
                    ELSE '{"accepted": false, "reason": "' || v.reason || '"}'
               END AS result
          FROM (
            SELECT w.*,
                   CASE WHEN w.decided AND w.reason = ''
                        THEN nextval('registry.checkins_id_seq') ELSE 0 END AS checkin_id
              FROM (
                SELECT d.*, count(*) FILTER (WHERE d.decided) OVER (ORDER BY d.i) AS nth
                  FROM (
                    -- the reason, in the order registry.cmd_scan checks
                    SELECT l.*, l.fast AND NOT l.key_seen AND NOT l.nonce_seen AS decided,
                           CASE WHEN NOT l.fast OR l.key_seen OR l.nonce_seen THEN NULL
                                WHEN NOT l.found THEN 'not_found'
                                -- a confirmed sign-up implies the person exists
                                WHEN NOT l.signed
                                     AND (SELECT true FROM registry.people pp
                                           WHERE pp.id = l.person) IS NULL THEN 'unknown_person'
                                WHEN NOT (l.walk_in OR l.signed) THEN 'not_signed_up'
                                WHEN (SELECT true FROM registry.checkins ci
                                       WHERE ci.activity_id = l.subject AND ci.person_id = l.person
                                         AND ci.checked_out_at IS NULL) IS NOT NULL
                                     THEN 'already_checked_in'
                                ELSE ''
                           END AS reason
                      FROM (
                        -- one unique-index probe per lookup: scalar subqueries,
                        -- which the planner cannot turn into a read of a whole
                        -- index (see 004_lanes.sql)
                        SELECT f.*, a.auto_checkout_at AS auto, a.id IS NOT NULL AS found,
                               coalesce(a.walk_in, false) AS walk_in,
                               coalesce(a.community_id, f.community) AS comm,
                               f.fast AND f.key <> ''
                                   AND (SELECT true FROM registry.command_log cl
                                         WHERE cl.key = f.key) IS NOT NULL AS key_seen,
                               f.fast AND f.device <> ''
                                   AND (SELECT true FROM registry.scans s
                                         WHERE s.device_id = f.device AND s.counter = f.counter
                                           AND s.device_id <> '') IS NOT NULL AS nonce_seen,
                               f.fast AND a.id IS NOT NULL AND NOT a.walk_in
                                   AND (SELECT true FROM registry.signups u
                                         WHERE u.activity_id = f.subject AND u.person_id = f.person
                                           AND u.status = 'confirmed') IS NOT NULL AS signed
                          FROM (
                            -- the run; the daemon sends only valid rows, anything
                            -- else is left to registry.exec, which answers it
                            SELECT (p_first + t.ord - 1)::integer AS i, coalesce(t.key, '') AS key,
                                   t.now, coalesce(t.trace, '') AS trace, t.person, t.subject,
                                   t.community, t.device, t.counter, t.expected,
                                   CASE WHEN t.at = 0 THEN t.now ELSE t.at END AS at_ms,
                                   coalesce(t.subject > 0 AND t.person > 0 AND t.community >= 0
                                     AND t.at >= 0 AND t.now IS NOT NULL AND t.counter IS NOT NULL
                                     AND (t.expected = 0 OR t.expected = t.subject)
                                     AND octet_length(t.device) <= 64
                                     AND octet_length(coalesce(t.key, '')) <= 256
                                     AND t.person <> ALL (v_dup_person)
                                     AND (t.device = ''
                                          OR t.counter || ' ' || t.device <> ALL (v_dup_nonce))
                                     AND (coalesce(t.key, '') = '' OR t.key <> ALL (v_dup_key)),
                                     false) AS fast
                              FROM unnest(p_key, p_now, p_trace, p_person, p_subject, p_community,
                                          p_device, p_counter, p_at, p_expected)
                                   WITH ORDINALITY AS t (key, now, trace, person, subject,
                                                         community, device, counter, at,
                                                         expected, ord)
                            OFFSET 0
                          ) f
                          LEFT JOIN acts a ON a.id = f.subject AND f.fast
                        OFFSET 0
                      ) l
                    OFFSET 0
                  ) d
              ) w
            OFFSET 0
          ) v
    ), turn AS (
        -- the stream's write turn, taken after the reading and checking
        -- (see registry.exec_batch), and only when the run writes events: a
        -- run of retries left to registry.exec must not hold it until commit
        SELECT registry.s_outbox_turn() AS last_seq
         WHERE EXISTS (SELECT 1 FROM res x WHERE x.decided)
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
         WHERE x.decided
    ), ins_checkin AS (
        INSERT INTO registry.checkins (id, community_id, activity_id, person_id, device_id,
                                       checked_in_at, auto_checkout_at)
        OVERRIDING SYSTEM VALUE
        SELECT x.checkin_id, x.comm, x.subject, x.person, x.device, x.at_ms, x.auto
          FROM res x WHERE x.decided AND x.reason = ''
    ), ins_scan AS (
        INSERT INTO registry.scans (device_id, counter, person_id, kind, subject_id, community_id,
                                    exit, expected_id, verdict, scanned_at, received_at,
                                    accepted, reason, checkin_id, stamps, stations)
        SELECT x.device, x.counter, x.person, 'a', x.subject, x.comm, false, x.expected, 'ok',
               x.at_ms, x.now, x.reason = '', x.reason, x.checkin_id, 0, 0
          FROM res x WHERE x.decided
    ), ins_log AS (
        INSERT INTO registry.command_log (key, command, code, message, result)
        SELECT x.key, 'scan', x.code, x.message, x.result::jsonb
          FROM res x WHERE x.decided AND x.key <> ''
    )
    SELECT x.i, x.code, x.message, x.result FROM res x;
END
$$;
