-- Timebank command functions, end to end in SQL.
--
-- Runs on a fresh copy of a database with every service's migrations applied
-- (scripts/test, "SQL tests"). It drives the timebank only through
-- timebank.exec(name, idempotency_key, args, ctx), feeding it registry events
-- the way the daemon's subscriber does (the internal command apply_event),
-- and reads its tables to check what was written. The last line printed is
-- "timebank_test: N checks passed".
--
-- The people are invented; the places are Jianghai District's: 江翠社区 and
-- 新中社区, the door-knocking visits (邻里敲门乐) and the shared classroom
-- (邻里共享课堂) of the Happiness Neighbourhood Festival.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

SET t.name = 'timebank_test';
\ir lib/t.sql

-- day d of the test calendar (2026-07-04 00:00 Asia/Shanghai, the festival's
-- launch day, is day 0), plus hours
CREATE FUNCTION t.at(p_day integer, p_hours numeric DEFAULT 0) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT 1783094400000 + p_day * 86400000::bigint + (p_hours * 3600000)::bigint
$$;

CREATE FUNCTION t.run(p_cmd text, p_args jsonb, p_now bigint, p_key text DEFAULT '')
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
BEGIN
    RETURN timebank.exec(p_cmd, p_key, p_args,
                         jsonb_build_object('now', p_now, 'trace_id', 'trace-' || p_cmd));
END
$$;

-- Every row of every timebank table, hashed: equal before and after a
-- command means the command wrote nothing.
CREATE FUNCTION t.fp() RETURNS text
LANGUAGE sql AS $$ SELECT t.fp_of('timebank') $$;

CREATE FUNCTION t.okr(p_cmd text, p_args jsonb, p_now bigint, p_label text,
                      p_key text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r timebank.cmd_result;
BEGIN
    r := t.run(p_cmd, p_args, p_now, p_key);
    IF r.code IS DISTINCT FROM 'ok' THEN
        RAISE EXCEPTION 'timebank_test: FAILED: %: % returned % (%), args %',
            p_label, p_cmd, r.code, r.message, p_args;
    END IF;
    PERFORM t.ok(r.result IS NOT NULL, p_label || ': ok with a result');
    RETURN r.result;
END
$$;

CREATE FUNCTION t.err(p_cmd text, p_args jsonb, p_now bigint, p_code text, p_label text)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_before  text := t.fp();
    r         timebank.cmd_result;
BEGIN
    r := t.run(p_cmd, p_args, p_now);
    PERFORM t.eq(r.code, p_code, p_label || ': ' || p_code);
    PERFORM t.ok(coalesce(r.message, '') <> '', p_label || ': has a message');
    PERFORM t.eq(t.fp(), v_before, p_label || ': nothing written');
    RETURN r;
END
$$;

-- Applies the next registry event (stream position kept in t.v 'seq').
CREATE FUNCTION t.ev(p_type text, p_payload jsonb, p_at bigint DEFAULT 1783094400000)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_seq  bigint;
    r      timebank.cmd_result;
BEGIN
    SELECT coalesce(max(id), 0) + 1 INTO v_seq FROM t.v WHERE k = 'seq';
    r := t.run('apply_events', jsonb_build_object('stream', 'registry', 'epoch', 7,
               'first', v_seq, 'last', v_seq, 'events', jsonb_build_array(jsonb_build_object(
                   'seq', v_seq, 'type', p_type, 'at', p_at, 'p', p_payload))), p_at);
    IF r.code <> 'ok' THEN
        RAISE EXCEPTION 'timebank_test: FAILED: event % % returned % (%)', v_seq, p_type,
            r.code, r.message;
    END IF;
    PERFORM t.set('seq', v_seq);
    RETURN r;
END
$$;

CREATE FUNCTION t.person(p_id bigint, p_community bigint, VARIADIC p_roles text[])
RETURNS void
LANGUAGE sql AS $$
    SELECT t.ev('person_registered', jsonb_build_object('id', p_id, 'community_id', p_community,
                                                        'roles', to_jsonb(p_roles)))
$$;

CREATE FUNCTION t.bal(p_person bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT balance FROM timebank.accounts WHERE person_id = p_person $$;

CREATE FUNCTION t.sys(p_community bigint, p_kind text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT balance FROM timebank.accounts WHERE community_id = p_community AND kind = p_kind
$$;

CREATE FUNCTION t.eid() RETURNS bigint
LANGUAGE sql AS $$ SELECT coalesce(max(seq), 0) FROM timebank.outbox $$;

CREATE FUNCTION t.events(p_since bigint) RETURNS text[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(type ORDER BY seq), '{}') FROM timebank.outbox WHERE seq > p_since
$$;

CREATE FUNCTION t.payload(p_since bigint, p_type text, p_n integer DEFAULT 1) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT payload::jsonb FROM timebank.outbox WHERE seq > p_since AND type = p_type
     ORDER BY seq OFFSET p_n - 1 LIMIT 1
$$;

-- The full rule set of a community with some fields replaced.
CREATE FUNCTION t.rules(p_community bigint, p_change jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT timebank.s_rules_json(r) - 'changed_at' - 'changed_by' || p_change
      FROM timebank.rules r WHERE r.community_id = p_community
$$;

-- The ledger's invariants; p_label names the moment.
CREATE FUNCTION t.invariants(p_label text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM t.eq((SELECT count(*) FROM timebank.accounts a
                   WHERE a.balance <> coalesce((SELECT sum(amount) FROM timebank.entries e
                                                 WHERE e.account_id = a.id), 0)),
                 0::bigint, p_label || ': every balance is the sum of its entries');
    PERFORM t.eq((SELECT count(*) FROM (SELECT transfer_id FROM timebank.entries
                                          GROUP BY transfer_id HAVING sum(amount) <> 0) x),
                 0::bigint, p_label || ': every movement balances');
    PERFORM t.eq((SELECT count(*) FROM timebank.transfers t
                   WHERE (SELECT count(*) FROM timebank.entries e WHERE e.transfer_id = t.id)
                         NOT IN (2, 4)),
                 0::bigint, p_label || ': every movement has two or four entries');
    PERFORM t.eq((SELECT count(*) FROM timebank.accounts a
                   JOIN timebank.rules r ON r.community_id = a.community_id
                  WHERE a.kind = 'person' AND a.balance < -r.overdraft_minutes),
                 0::bigint, p_label || ': no member below the limit');
    PERFORM t.eq((SELECT count(*) FROM timebank.entries e
                   WHERE e.balance <> (SELECT sum(amount) FROM timebank.entries x
                                        WHERE x.account_id = e.account_id AND x.id <= e.id)),
                 0::bigint, p_label || ': every entry carries its running balance');
    PERFORM t.eq((SELECT count(*) FROM timebank.accounts a
                   WHERE a.kind = 'person' AND a.earned <>
                         coalesce((SELECT sum(CASE WHEN t.kind = 'credit' THEN t.minutes
                                                   ELSE -t.minutes END)
                                     FROM timebank.transfers t
                                     LEFT JOIN timebank.transfers o ON o.id = t.reverses_id
                                    WHERE (t.kind = 'credit' AND t.to_account = a.id)
                                       OR (o.kind = 'credit' AND o.to_account = a.id)), 0)),
                 0::bigint, p_label || ': earned minutes are the credits that stand');
END
$$;

-- ---------------------------------------------------------------- the town
-- communities 101 江翠社区, 102 新中社区; people:
--   201 Organiser Lin (江翠)       202 Organiser Zhao (江翠)
--   203 Teacher Chen, volunteer     204, 205 her sons, volunteers
--   206 Grandma Chen, resident      207 Organiser Wu (新中)
--   208 Repairer Huang (新中)        209 resident of 新中
-- activities 301 邻里敲门乐 (江翠, 2 h), 302 邻里共享课堂 (新中, 3 h)

DO $$
DECLARE
    r  timebank.cmd_result;
    e  bigint;
BEGIN
    PERFORM t.ev('community_created', '{"id": 101, "name": "江翠社区", "district": "江海区"}');
    PERFORM t.ev('community_created', '{"id": 102, "name": "新中社区", "district": "江海区"}');
    PERFORM t.person(201, 101, 'ROLE_ORGANISER');
    PERFORM t.person(202, 101, 'ROLE_ORGANISER', 'ROLE_RESIDENT');
    PERFORM t.person(203, 101, 'ROLE_VOLUNTEER', 'ROLE_RESIDENT');
    PERFORM t.person(204, 101, 'ROLE_VOLUNTEER');
    PERFORM t.person(205, 101, 'ROLE_VOLUNTEER');
    PERFORM t.person(206, 101, 'ROLE_RESIDENT');
    PERFORM t.person(207, 102, 'ROLE_ORGANISER');
    PERFORM t.person(208, 102, 'ROLE_VOLUNTEER');
    PERFORM t.person(209, 102, 'ROLE_RESIDENT');
    PERFORM t.ev('activity_created', jsonb_build_object('id', 301, 'community_id', 101,
        'title', '邻里敲门乐', 'capacity', 20, 'starts_at', t.at(1, 9), 'ends_at', t.at(1, 11)));
    PERFORM t.ev('activity_created', jsonb_build_object('id', 302, 'community_id', 102,
        'title', '邻里共享课堂', 'capacity', 30, 'starts_at', t.at(2, 14), 'ends_at', t.at(2, 17)));
    -- an event the timebank does not use still moves the position
    PERFORM t.ev('signed_up', '{"signup_id": 1, "activity_id": 301, "person_id": 206}');

    PERFORM t.eq((SELECT count(*) FROM timebank.accounts WHERE kind = 'person'), 9::bigint,
                 'one account per person');
    PERFORM t.eq((SELECT count(*) FROM timebank.accounts WHERE kind = 'pool'), 2::bigint,
                 'one pool per community');
    PERFORM t.eq((SELECT count(*) FROM timebank.accounts WHERE kind = 'clearing'), 2::bigint,
                 'one clearing account per community');
    PERFORM t.eq((SELECT count(*) FROM timebank.rule_log WHERE reason = 'defaults'), 2::bigint,
                 'default rules logged');
    PERFORM t.ok((SELECT organiser AND NOT volunteer IS NULL FROM timebank.people WHERE id = 201),
                 'organiser known');
    PERFORM t.ok((SELECT NOT volunteer AND NOT organiser FROM timebank.people WHERE id = 206),
                 'resident known');
    PERFORM t.eq((SELECT seq FROM timebank.inbox WHERE stream = 'registry'), 14::bigint,
                 'position stored');

    -- replayed and skipped events
    r := t.run('apply_events', '{"stream": "registry", "epoch": 7, "first": 3, "last": 3, "events": [{"seq": 3, "type": "person_registered", "at": 1, "p": {"id": 201, "community_id": 102, "roles": []}}]}', t.at(0));
    PERFORM t.eq(r.code, 'ok', 'a replayed event is fine');
    PERFORM t.eq(r.message, 'duplicate', 'a replayed event is a duplicate');
    PERFORM t.eq((SELECT community_id FROM timebank.people WHERE id = 201), 101::bigint,
                 'a replayed event changes nothing');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 7, "first": 16, "last": 16, "events": []}', t.at(0), 'gap', 'events past a gap');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 8, "first": 5, "last": 9, "events": []}', t.at(0), 'epoch_changed', 'a new epoch');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 8, "first": 1, "last": 1, "events": [{"seq": 1, "type": "person_registered", "p": {"id": 201, "community_id": 102}}]}', t.at(0), 'epoch_changed', 'a new epoch from 1: the registry''s ids no longer name our people');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 7, "last": 20, "events": []}', t.at(0), 'invalid_argument', 'run without a first');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 7, "first": 15, "last": 16, "events": [{"seq": 17, "type": "x"}]}', t.at(0), 'invalid_argument', 'event outside its run');
    PERFORM t.err('apply_events', '{"stream": "registry", "epoch": 7, "first": 15, "last": 16, "events": [{"seq": 15, "type": "person_registered", "p": {"id": 299, "community_id": 101}}, 5]}', t.at(0), 'invalid_argument', 'a run with a bad event applies nothing');
    PERFORM t.err('apply_events', '{"stream": "other", "epoch": 1, "first": 2, "last": 2, "events": []}', t.at(0), 'gap', 'first event of a stream is 1');
    -- a run overlapping what was applied: only the new part counts; ignored
    -- kinds are not sent, only their numbers move the position
    r := t.run('apply_events', '{"stream": "registry", "epoch": 7, "first": 13, "last": 16, "events": [{"seq": 13, "type": "person_registered", "at": 1, "p": {"id": 201, "community_id": 102, "roles": []}}, {"seq": 16, "type": "person_registered", "at": 1, "p": {"id": 210, "community_id": 102, "roles": ["ROLE_RESIDENT"]}}]}', t.at(0));
    PERFORM t.eq(r.code || r.message, 'okapplied', 'an overlapping run');
    PERFORM t.eq((SELECT community_id FROM timebank.people WHERE id = 201), 101::bigint,
                 'overlap: the applied part is skipped');
    PERFORM t.ok(EXISTS (SELECT 1 FROM timebank.accounts WHERE person_id = 210),
                 'overlap: the new part is applied');
    PERFORM t.eq((SELECT seq FROM timebank.inbox WHERE stream = 'registry'), 16::bigint,
                 'overlap: position at the run''s last');
    PERFORM t.set('seq', 16);

    -- what a client may not send
    PERFORM t.err('no_such', '{}', t.at(0), 'unknown_command', 'unknown command');
    PERFORM t.err('gift', '[]', t.at(0), 'invalid_argument', 'arguments not an object');
END
$$;

-- ---------------------------------------------------------------- records

DO $$
DECLARE
    res  jsonb;
    r    timebank.cmd_result;
    e    bigint := t.eid();
    rec  bigint;
BEGIN
    res := t.okr('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                 'activity_id', 301, 'minutes', 120, 'started_at', t.at(1, 9),
                 'field', 'elderly care', 'content', 'door-knocking visits to 12 households'),
                 t.at(1, 12), 'organiser records hours');
    rec := (res ->> 'record_id')::bigint;
    PERFORM t.set('rec1', rec);
    PERFORM t.eq(res ->> 'state', 'pending', 'a new record is pending');
    PERFORM t.eq((res ->> 'levels')::int, 1, 'one level by default');
    PERFORM t.eq((SELECT community_id FROM timebank.records WHERE id = rec), 101::bigint,
                 'the activity''s community');
    PERFORM t.eq((SELECT day FROM timebank.records WHERE id = rec), date '2026-07-05',
                 'the day in the community''s time zone');
    PERFORM t.eq(t.events(e), ARRAY['hours_recorded'], 'hours_recorded event');
    PERFORM t.eq((t.payload(e, 'hours_recorded') ->> 'minutes')::int, 120, 'event minutes');
    PERFORM t.eq(t.bal(203), 0::bigint, 'nothing credited while pending');

    -- a volunteer may propose their own hours, outside any activity
    res := t.okr('record_hours', jsonb_build_object('actor_id', 204, 'person_id', 204,
                 'minutes', 60, 'started_at', t.at(1, 14), 'field', 'tutoring'),
                 t.at(1, 16), 'volunteer proposes own hours');
    rec := (res ->> 'record_id')::bigint;
    PERFORM t.set('rec2', rec);
    PERFORM t.eq((SELECT community_id FROM timebank.records WHERE id = rec), 101::bigint,
                 'own community without an activity');

    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 0, 'started_at', t.at(1)), t.at(2), 'invalid_amount', 'zero minutes');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', -5, 'started_at', t.at(1)), t.at(2), 'invalid_amount',
                  'negative minutes');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 721, 'started_at', t.at(1)), t.at(2), 'record_limit',
                  'more than a record may hold');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 1800, 'started_at', t.at(1)), t.at(2), 'record_limit',
                  'a 30-hour record');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 999,
                  'minutes', 30, 'started_at', t.at(1)), t.at(2), 'not_found', 'unknown person');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'activity_id', 399, 'minutes', 30, 'started_at', t.at(1)), t.at(2), 'not_found',
                  'unknown activity');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 206, 'person_id', 203,
                  'minutes', 30, 'started_at', t.at(1)), t.at(2), 'forbidden',
                  'a resident records for someone else');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 207, 'person_id', 203,
                  'activity_id', 301, 'minutes', 30, 'started_at', t.at(1)), t.at(2), 'forbidden',
                  'an organiser of another community');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'activity_id', 301, 'community_id', 102, 'minutes', 30,
                  'started_at', t.at(1)), t.at(2), 'invalid_argument',
                  'community other than the activity''s');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 30, 'started_at', t.at(3)), t.at(2), 'invalid_argument',
                  'service in the future');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', '30', 'started_at', t.at(1)), t.at(2), 'invalid_argument',
                  'minutes as a string');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 30, 'started_at', t.at(1), 'field', repeat('x', 65)), t.at(2),
                  'invalid_argument', 'field too long');
    -- no 30-hour days: 120 on day 1 already, 720 more fit, then 121 do not
    PERFORM t.okr('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 720, 'started_at', t.at(1, 13)), t.at(2), 'a long day');
    PERFORM t.err('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 121, 'started_at', t.at(1, 22)), t.at(2), 'day_limit',
                  'more than the daily maximum');
    PERFORM t.okr('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'minutes', 120, 'started_at', t.at(1, 22)), t.at(2), 'up to the daily maximum');
END
$$;

-- ---------------------------------------------------------------- approval

DO $$
DECLARE
    res  jsonb;
    r    timebank.cmd_result;
    e    bigint := t.eid();
    rec  bigint := t.id('rec1');
BEGIN
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 203, 'record_id', rec),
                  t.at(2), 'self_approval', 'a volunteer approves own hours');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 206, 'record_id', rec),
                  t.at(2), 'forbidden', 'a resident approves');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 207, 'record_id', rec),
                  t.at(2), 'forbidden', 'an organiser of another community approves');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 201, 'record_id', 99999),
                  t.at(2), 'not_found', 'unknown record');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 201), t.at(2),
                  'invalid_argument', 'no record id');

    res := t.okr('approve_hours', jsonb_build_object('actor_id', 201, 'record_id', rec), t.at(2),
                 'organiser approves', 'approve-rec1');
    PERFORM t.eq(res ->> 'state', 'credited', 'one level: credited at once');
    PERFORM t.ok((res ->> 'transfer_id')::bigint > 0, 'credited by a movement');
    PERFORM t.eq(t.bal(203), 120::bigint, 'volunteer credited');
    PERFORM t.eq(t.sys(101, 'pool'), -120::bigint, 'from the community pool');
    PERFORM t.eq((SELECT earned FROM timebank.accounts WHERE person_id = 203), 120::bigint,
                 'earned minutes');
    PERFORM t.eq(t.events(e), ARRAY['hours_reviewed', 'credited'], 'reviewed and credited events');
    PERFORM t.eq(t.payload(e, 'credited') ->> 'to_person_id', '203', 'credited event names the volunteer');
    PERFORM t.eq((SELECT array_agg(state ORDER BY id) FROM timebank.record_log WHERE record_id = rec),
                 ARRAY['pending', 'approved', 'credited'], 'pending, approved, credited');

    -- the retry gets the first reply and posts nothing
    r := t.run('approve_hours', jsonb_build_object('actor_id', 201, 'record_id', rec), t.at(3),
               'approve-rec1');
    PERFORM t.eq(r.code, 'ok', 'retried approval: ok');
    PERFORM t.eq(r.result, res, 'retried approval: the first reply');
    PERFORM t.eq((SELECT count(*) FROM timebank.transfers WHERE record_id = rec), 1::bigint,
                 'retried approval: one movement');
    r := t.run('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 1}', t.at(3),
               'approve-rec1');
    PERFORM t.eq(r.code, 'idempotency_conflict', 'key reused for another command');
    PERFORM t.eq(t.bal(206), 0::bigint, 'conflicting key: nothing moved');

    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 202, 'record_id', rec),
                  t.at(3), 'already_credited', 'double verification');
    PERFORM t.err('decline_hours', jsonb_build_object('actor_id', 202, 'record_id', rec,
                  'reason', 'late'), t.at(3), 'already_credited', 'declining credited hours');
END
$$;

-- two levels, declines
DO $$
DECLARE
    res  jsonb;
    e    bigint;
    rec  bigint;
BEGIN
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 203, 'reason', 'more checks',
                  'rules', t.rules(101, '{"approval_levels": 2}')), t.at(3), 'forbidden',
                  'a volunteer sets rules');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201,
                  'rules', t.rules(101, '{"approval_levels": 2}')), t.at(3), 'invalid_argument',
                  'rules without a reason');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"approval_levels": 3}')), t.at(3), 'invalid_argument',
                  'three levels');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"max_day_minutes": 1800}')), t.at(3), 'invalid_argument',
                  'a 30-hour day');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"gift_policy": "friends"}')), t.at(3), 'invalid_argument',
                  'unknown gift policy');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"overdraft_minutes": 3000000000}')), t.at(3),
                  'invalid_argument', 'overdraft past the integer range');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"approval_levels": 70000}')), t.at(3), 'invalid_argument',
                  'levels past the smallint range');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"star_hours": [300, 100]}')), t.at(3), 'invalid_argument',
                  'stars out of order');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"timezone": "Mars/Olympus"}')), t.at(3), 'invalid_argument',
                  'unknown time zone');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'x',
                  'rules', t.rules(101, '{"community_id": 199}')), t.at(3), 'not_found',
                  'rules of an unknown community');
    e := t.eid();
    res := t.okr('set_rules', jsonb_build_object('actor_id', 201,
                 'reason', 'committee decision 2026-07: two approvals',
                 'rules', t.rules(101, '{"approval_levels": 2}')), t.at(3), 'two levels');
    PERFORM t.eq((res -> 'rules' ->> 'approval_levels')::int, 2, 'rules result');
    PERFORM t.eq((res -> 'rules' ->> 'changed_by')::bigint, 201::bigint, 'who changed them');
    PERFORM t.eq(t.events(e), ARRAY['rules_changed'], 'rules_changed event');
    PERFORM t.ok((SELECT old_rules ->> 'approval_levels' = '1' AND new_rules ->> 'approval_levels' = '2'
                         AND actor_id = 201 AND at = t.at(3)
                    FROM timebank.rule_log ORDER BY id DESC LIMIT 1),
                 'rule log: who, when, before and after');
    res := t.okr('get_rules', '{"community_id": 101}', t.at(3), 'get rules');
    PERFORM t.eq((res -> 'rules' ->> 'approval_levels')::int, 2, 'get rules: the new set');

    -- the pending record made before the change keeps its one level; a new one needs two
    rec := t.id('rec2');
    res := t.okr('record_hours', jsonb_build_object('actor_id', 201, 'person_id', 204,
                 'activity_id', 301, 'minutes', 90, 'started_at', t.at(1, 9)), t.at(3),
                 'record under two levels');
    rec := (res ->> 'record_id')::bigint;
    PERFORM t.set('rec3', rec);
    res := t.okr('approve_hours', jsonb_build_object('actor_id', 201, 'record_id', rec), t.at(3),
                 'first level');
    PERFORM t.eq(res ->> 'state', 'approved', 'first level: approved, not yet credited');
    PERFORM t.eq(t.bal(204), 0::bigint, 'first level: nothing credited');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 201, 'record_id', rec),
                  t.at(3), 'already_approved', 'the same organiser twice');
    res := t.okr('approve_hours', jsonb_build_object('actor_id', 202, 'record_id', rec), t.at(3),
                 'second level');
    PERFORM t.eq(res ->> 'state', 'credited', 'second level: credited');
    PERFORM t.eq((res ->> 'approvals')::int, 2, 'second level: two approvals');
    PERFORM t.eq(t.bal(204), 90::bigint, 'second level: credited');

    -- decline
    res := t.okr('record_hours', jsonb_build_object('actor_id', 205, 'person_id', 205,
                 'minutes', 600, 'started_at', t.at(1, 8)), t.at(3), 'a doubtful claim');
    rec := (res ->> 'record_id')::bigint;
    PERFORM t.err('decline_hours', jsonb_build_object('actor_id', 205, 'record_id', rec,
                  'reason', 'oops'), t.at(3), 'self_approval', 'declining own hours');
    PERFORM t.err('decline_hours', jsonb_build_object('actor_id', 201, 'record_id', rec),
                  t.at(3), 'invalid_argument', 'decline without a reason');
    e := t.eid();
    res := t.okr('decline_hours', jsonb_build_object('actor_id', 201, 'record_id', rec,
                 'reason', 'not on the duty roster that day'), t.at(3), 'decline');
    PERFORM t.eq(res ->> 'state', 'declined', 'declined');
    PERFORM t.eq(t.payload(e, 'hours_reviewed') ->> 'state', 'declined', 'declined event');
    PERFORM t.err('approve_hours', jsonb_build_object('actor_id', 202, 'record_id', rec),
                  t.at(3), 'record_declined', 'approving declined hours');
    PERFORM t.err('decline_hours', jsonb_build_object('actor_id', 202, 'record_id', rec,
                  'reason', 'again'), t.at(3), 'record_declined', 'declining twice');
    PERFORM t.eq((SELECT state FROM timebank.records WHERE id = rec), 'declined', 'the record stays');
    PERFORM t.invariants('after approvals');
END
$$;

-- ---------------------------------------------------------------- gifts

DO $$
DECLARE
    res  jsonb;
    e    bigint := t.eid();
BEGIN
    res := t.okr('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 60, "memo": "for Grandma"}',
                 t.at(4), 'gift to the elderly parent', 'gift-1');
    PERFORM t.set('gift1', (res ->> 'transfer_id')::bigint);
    -- (t.id in a query of the block that set it would be planned before the set is seen)
    PERFORM t.eq(res ->> 'kind', 'gift', 'gift result kind');
    PERFORM t.eq((res ->> 'from_balance')::bigint, 60::bigint, 'gift result: giver balance');
    PERFORM t.eq((res ->> 'to_balance')::bigint, 60::bigint, 'gift result: receiver balance');
    PERFORM t.eq(t.events(e), ARRAY['gifted'], 'gifted event');
    PERFORM t.eq((t.payload(e, 'gifted') ->> 'minutes')::int, 60, 'gifted event minutes');
    PERFORM t.eq((SELECT command_key FROM timebank.transfers
                   WHERE id = (res ->> 'transfer_id')::bigint), 'gift-1',
                 'the movement keeps its command key');

    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 203, "minutes": 10}', t.at(4),
                  'self_transfer', 'gift to oneself');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 0}', t.at(4),
                  'invalid_amount', 'zero gift');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": -10}', t.at(4),
                  'invalid_amount', 'negative gift');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 60000001}',
                  t.at(4), 'amount_too_large', 'huge gift');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 1e30}',
                  t.at(4), 'invalid_argument', 'overflowing gift');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 61}', t.at(4),
                  'insufficient_balance', 'gift past the balance');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 998, "minutes": 1}', t.at(4),
                  'not_found', 'gift to nobody');
    PERFORM t.err('gift', jsonb_build_object('from_person_id', 203, 'to_person_id', 206,
                  'minutes', 1, 'memo', repeat('m', 201)), t.at(4), 'invalid_argument',
                  'memo too long');

    -- policies
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 202, 'reason', 'family only',
                  'rules', t.rules(101, '{"gift_policy": "family"}')), t.at(4), 'family policy');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 204, "minutes": 5}', t.at(4),
                  'recipient_not_allowed', 'gift to an unlinked person');
    PERFORM t.err('link_family', '{"actor_id": 206, "person_id": 203, "relative_id": 204, "relation": "son"}',
                  t.at(4), 'forbidden', 'someone else links family');
    PERFORM t.err('link_family', '{"actor_id": 203, "person_id": 203, "relative_id": 203, "relation": "self"}',
                  t.at(4), 'self_transfer', 'oneself as family');
    PERFORM t.okr('link_family', '{"actor_id": 203, "person_id": 203, "relative_id": 204, "relation": "son"}',
                  t.at(4), 'link family');
    PERFORM t.okr('link_family', '{"actor_id": 201, "person_id": 204, "relative_id": 203, "relation": "mother"}',
                  t.at(4), 'linking again changes nothing');
    PERFORM t.eq((SELECT count(*) FROM timebank.family), 2::bigint, 'one link, both ways');
    PERFORM t.okr('gift', '{"from_person_id": 204, "to_person_id": 203, "minutes": 30}', t.at(4),
                  'gift to family, the other way');
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 202, 'reason', 'community only',
                  'rules', t.rules(101, '{"gift_policy": "community"}')), t.at(4), 'community policy');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 208, "minutes": 5}', t.at(4),
                  'recipient_not_allowed', 'gift to another community');
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 202, 'reason', 'paused',
                  'rules', t.rules(101, '{"gift_policy": "none"}')), t.at(4), 'no gifts');
    PERFORM t.err('gift', '{"from_person_id": 203, "to_person_id": 206, "minutes": 5}', t.at(4),
                  'gifts_not_allowed', 'gifts paused');
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 202, 'reason', 'open again',
                  'rules', t.rules(101, '{"gift_policy": "anyone"}')), t.at(4), 'gifts open');
    PERFORM t.eq((SELECT count(*) FROM timebank.rule_log WHERE community_id = 101), 6::bigint,
                 'every rule change logged');
    PERFORM t.invariants('after gifts');
END
$$;

-- ---------------------------------------------------------------- spending

DO $$
DECLARE
    res  jsonb;
    r    timebank.cmd_result;
    e    bigint := t.eid();
BEGIN
    res := t.okr('spend', '{"person_id": 206, "minutes": 30, "service": "elderly care", "memo": "a morning of help"}',
                 t.at(5), 'spend on the community pool');
    PERFORM t.eq(t.bal(206), 30::bigint, 'spend: balance');
    PERFORM t.eq(t.sys(101, 'pool'), -180::bigint, 'spend: back to the pool');
    PERFORM t.eq(t.events(e), ARRAY['spent'], 'spent event');
    PERFORM t.eq((SELECT memo FROM timebank.transfers WHERE id = (res ->> 'transfer_id')::bigint),
                 'elderly care: a morning of help', 'spend memo');

    PERFORM t.err('spend', '{"person_id": 206, "minutes": 10}', t.at(5), 'invalid_argument',
                  'spend without a service');
    PERFORM t.err('spend', '{"person_id": 206, "provider_id": 206, "minutes": 10, "service": "x"}',
                  t.at(5), 'self_transfer', 'paying oneself');
    PERFORM t.err('spend', '{"person_id": 206, "provider_id": 997, "minutes": 10, "service": "x"}',
                  t.at(5), 'not_found', 'unknown provider');
    PERFORM t.err('spend', '{"person_id": 206, "community_id": 197, "minutes": 10, "service": "x"}',
                  t.at(5), 'not_found', 'unknown pool');
    PERFORM t.err('spend', '{"person_id": 206, "minutes": 31, "service": "x"}', t.at(5),
                  'insufficient_balance', 'spend past the balance');

    -- minimum held
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'save first',
                  'rules', t.rules(101, '{"min_held_minutes": 100}')), t.at(5), 'minimum held');
    PERFORM t.err('spend', '{"person_id": 206, "minutes": 10, "service": "repair"}', t.at(5),
                  'below_min_held', 'spend below the minimum held');
    PERFORM t.okr('gift', '{"from_person_id": 206, "to_person_id": 203, "minutes": 10}', t.at(5),
                  'gifts are not spends');

    -- overdraft and clearing between communities
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'credit for newcomers',
                  'rules', t.rules(101, '{"min_held_minutes": 0, "overdraft_minutes": 60}')),
                  t.at(5), 'overdraft 60');
    res := t.okr('spend', '{"person_id": 205, "provider_id": 208, "minutes": 60, "service": "appliance repair"}',
                 t.at(5), 'spend into overdraft at a provider of another community');
    PERFORM t.eq(t.bal(205), -60::bigint, 'overdrawn to the limit');
    PERFORM t.eq(t.bal(208), 60::bigint, 'the provider is paid');
    PERFORM t.eq((SELECT count(*) FROM timebank.entries WHERE transfer_id = (res ->> 'transfer_id')::bigint),
                 4::bigint, 'across communities: four entries');
    PERFORM t.eq(t.sys(101, 'clearing'), 60::bigint, '江翠 clearing: owes out');
    PERFORM t.eq(t.sys(102, 'clearing'), -60::bigint, '新中 clearing: is owed');
    PERFORM t.err('spend', '{"person_id": 205, "provider_id": 208, "minutes": 1, "service": "x"}',
                  t.at(5), 'insufficient_balance', 'one minute past the limit');
    PERFORM t.err('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'no more credit',
                  'rules', t.rules(101, '{"overdraft_minutes": 0}')), t.at(5), 'limit_in_use',
                  'limit below a member''s balance');
    PERFORM t.invariants('after spends');
END
$$;

-- ---------------------------------------------------------------- reversals

DO $$
DECLARE
    res  jsonb;
    e    bigint := t.eid();
    g    bigint := t.id('gift1');
    b203 bigint := t.bal(203);
    b206 bigint := t.bal(206);
    rv   bigint;
BEGIN
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 206, 'transfer_id', g, 'reason', 'mine'),
                  t.at(6), 'forbidden', 'a resident reverses');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 207, 'transfer_id', g, 'reason', 'x'),
                  t.at(6), 'forbidden', 'an organiser of an untouched community reverses');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 201, 'transfer_id', g), t.at(6),
                  'invalid_argument', 'reversal without a reason');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 201, 'transfer_id', 999999, 'reason', 'x'),
                  t.at(6), 'not_found', 'unknown movement');
    -- Grandma spent 30 of the 60 and gave 10 away: undoing the whole gift would overdraw her
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'back to none',
                  'rules', t.rules(101, '{"overdraft_minutes": 60}')), t.at(6), 'keep overdraft');
    PERFORM t.okr('gift', '{"from_person_id": 204, "to_person_id": 206, "minutes": 50}', t.at(6),
                  'top up grandma');
    b206 := t.bal(206);
    res := t.okr('reverse', jsonb_build_object('actor_id', 201, 'transfer_id', g,
                 'reason', 'gift sent to the wrong account'), t.at(6), 'reverse a gift');
    rv := (res ->> 'transfer_id')::bigint;
    PERFORM t.eq(t.bal(203), b203 + 60, 'reversal: giver restored');
    PERFORM t.eq(t.bal(206), b206 - 60, 'reversal: receiver debited');
    PERFORM t.eq((SELECT reverses_id FROM timebank.transfers WHERE id = rv), g,
                 'the reversal points at the original');
    PERFORM t.eq((SELECT memo || '/' || actor_id FROM timebank.transfers WHERE id = rv),
                 'gift sent to the wrong account/201', 'the reversal says who and why');
    PERFORM t.eq(t.events(e), ARRAY['rules_changed', 'gifted', 'reversed'], 'reversed event');
    PERFORM t.eq((t.payload(e, 'reversed') ->> 'reverses_id')::bigint, g, 'reversed event points back');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 202, 'transfer_id', g, 'reason', 'x'),
                  t.at(6), 'already_reversed', 'reversing twice');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 202, 'transfer_id', rv, 'reason', 'x'),
                  t.at(6), 'not_reversible', 'reversing a reversal');

    -- a credit whose hours were spent cannot be taken back past the limit
    PERFORM t.okr('spend', '{"person_id": 204, "minutes": 50, "service": "lessons"}', t.at(6),
                  'son spends');
    PERFORM t.err('reverse', jsonb_build_object('actor_id', 201,
                  'transfer_id', (SELECT transfer_id FROM timebank.records WHERE id = t.id('rec3')),
                  'reason', 'x'), t.at(6), 'insufficient_balance', 'reversing spent hours');
    -- a credit that stands can be
    res := t.okr('reverse', jsonb_build_object('actor_id', 202,
                 'transfer_id', (SELECT transfer_id FROM timebank.records WHERE id = t.id('rec1')),
                 'reason', 'the visits were on another volunteer''s roster'), t.at(6),
                 'reverse a credit');
    PERFORM t.eq((SELECT state FROM timebank.records WHERE id = t.id('rec1')), 'reversed',
                 'the record is marked reversed');
    PERFORM t.eq((SELECT earned FROM timebank.accounts WHERE person_id = 203), 0::bigint,
                 'earned minutes taken back');
    PERFORM t.eq((SELECT array_agg(state ORDER BY id) FROM timebank.record_log
                   WHERE record_id = t.id('rec1')),
                 ARRAY['pending', 'approved', 'credited', 'reversed'], 'record history kept');
    PERFORM t.invariants('after reversals');
END
$$;

-- append-only
DO $$
DECLARE
    err text;
BEGIN
    BEGIN
        UPDATE timebank.entries SET amount = amount + 1 WHERE id = (SELECT min(id) FROM timebank.entries);
    EXCEPTION WHEN OTHERS THEN err := SQLERRM;
    END;
    PERFORM t.ok(err LIKE '%never changed%', 'entries cannot be updated');
    err := NULL;
    BEGIN
        DELETE FROM timebank.transfers WHERE id = t.id('gift1');
    EXCEPTION WHEN OTHERS THEN err := SQLERRM;
    END;
    PERFORM t.ok(err LIKE '%never changed%', 'transfers cannot be deleted');
    err := NULL;
    BEGIN
        DELETE FROM timebank.records WHERE id = t.id('rec1');
    EXCEPTION WHEN OTHERS THEN err := SQLERRM;
    END;
    PERFORM t.ok(err LIKE '%never changed%', 'records cannot be deleted');
    err := NULL;
    BEGIN
        INSERT INTO timebank.entries (transfer_id, account_id, amount, balance, at)
        VALUES (t.id('gift1'), 1, 5, 5, 0);
    EXCEPTION WHEN OTHERS THEN err := SQLERRM;
    END;
    PERFORM t.ok(err LIKE '%does not balance%', 'an unbalanced entry is refused');
    err := NULL;
    BEGIN
        UPDATE timebank.rule_log SET reason = 'nothing' WHERE true;
    EXCEPTION WHEN OTHERS THEN err := SQLERRM;
    END;
    PERFORM t.ok(err LIKE '%never changed%', 'the rule log cannot be rewritten');
END
$$;

-- ---------------------------------------------------------------- queries

DO $$
DECLARE
    res  jsonb;
    l    jsonb;
    r    timebank.cmd_result;
BEGIN
    res := t.okr('get_balance', '{"person_id": 203}', t.at(7), 'balance');
    PERFORM t.eq((res ->> 'balance')::bigint, t.bal(203), 'balance: the account''s');
    PERFORM t.eq((res ->> 'limit')::bigint, -60::bigint, 'balance: the limit');
    PERFORM t.eq(res ->> 'kind', 'person', 'balance: kind');
    PERFORM t.eq((res ->> 'next_star_minutes')::bigint, 6000::bigint, 'next star at 100 hours');
    res := t.okr('get_balance', jsonb_build_object('account_id',
                 (SELECT id FROM timebank.accounts WHERE community_id = 101 AND kind = 'pool')),
                 t.at(7), 'pool balance');
    PERFORM t.eq(res ->> 'kind', 'pool', 'pool balance: kind');
    PERFORM t.err('get_balance', '{"person_id": 996}', t.at(7), 'not_found', 'balance of nobody');
    PERFORM t.err('get_balance', '{}', t.at(7), 'not_found', 'balance of no account');

    -- statement of Teacher Chen: credit 120, gift -60, gift +30, gift +10, reversal +60, reversal -120
    res := t.okr('get_statement', jsonb_build_object('person_id', 203, 'from', t.at(0), 'to', t.at(30)),
                 t.at(7), 'statement');
    l := res -> 'lines';
    PERFORM t.eq(jsonb_array_length(l), 6, 'statement: six lines');
    PERFORM t.eq((res ->> 'opening_balance')::bigint, 0::bigint, 'statement: opening');
    PERFORM t.eq((res ->> 'closing_balance')::bigint, t.bal(203), 'statement: closing');
    PERFORM t.eq((SELECT array_agg((x ->> 'amount')::bigint ORDER BY i)
                    FROM jsonb_array_elements(l) WITH ORDINALITY AS a (x, i)),
                 ARRAY[120, -60, 30, 10, 60, -120]::bigint[], 'statement: amounts in order');
    PERFORM t.eq((SELECT array_agg((x ->> 'balance')::bigint ORDER BY i)
                    FROM jsonb_array_elements(l) WITH ORDINALITY AS a (x, i)),
                 ARRAY[120, 60, 90, 100, 160, 40]::bigint[], 'statement: running balance');
    PERFORM t.eq((l -> 1 ->> 'counterparty_person_id')::bigint, 206::bigint,
                 'statement: the gift''s counterparty');
    PERFORM t.eq(l -> 0 ->> 'kind', 'credit', 'statement: kind');
    -- a later period opens with the balance carried in
    res := t.okr('get_statement', jsonb_build_object('person_id', 203, 'from', t.at(5), 'to', t.at(30)),
                 t.at(7), 'statement from day 5');
    PERFORM t.eq((res ->> 'opening_balance')::bigint, 90::bigint, 'later statement: opening carried');
    -- paging
    res := t.okr('get_statement', jsonb_build_object('person_id', 203, 'from', t.at(0), 'to', t.at(30),
                 'limit', 4), t.at(7), 'statement page 1');
    PERFORM t.eq(jsonb_array_length(res -> 'lines'), 4, 'page 1: four lines');
    PERFORM t.ok((res ->> 'more')::boolean, 'page 1: more');
    res := t.okr('get_statement', jsonb_build_object('person_id', 203, 'from', t.at(0), 'to', t.at(30),
                 'limit', 4, 'after_entry_id', res -> 'lines' -> 3 -> 'entry_id'), t.at(7),
                 'statement page 2');
    PERFORM t.eq(jsonb_array_length(res -> 'lines'), 2, 'page 2: the rest');
    PERFORM t.ok(NOT (res ->> 'more')::boolean, 'page 2: no more');
    PERFORM t.eq((res ->> 'opening_balance')::bigint, 100::bigint, 'page 2: opens where page 1 ended');
    PERFORM t.err('get_statement', jsonb_build_object('person_id', 203, 'from', t.at(5), 'to', t.at(4)),
                  t.at(7), 'invalid_period', 'period backwards');
    PERFORM t.err('get_statement', jsonb_build_object('person_id', 203, 'from', 'yesterday'),
                  t.at(7), 'invalid_argument', 'period not a number');
    PERFORM t.err('get_statement', jsonb_build_object('person_id', 203, 'limit', 5000),
                  t.at(7), 'invalid_argument', 'page too long');

    -- totals: 江翠 credited 120 + 90 + 60 (rec2, approved below) ...
    res := t.okr('get_totals', '{"community_id": 101}', t.at(7), 'community totals');
    PERFORM t.eq((res ->> 'credited_minutes')::bigint, 90::bigint,
                 'credited net of the reversed credit');
    PERFORM t.eq((res ->> 'gifted_minutes')::bigint,
                 (SELECT sum(minutes) FROM timebank.transfers t WHERE kind = 'gift'
                     AND NOT EXISTS (SELECT 1 FROM timebank.transfers x WHERE x.reverses_id = t.id)),
                 'gifted net of the reversed gift');
    PERFORM t.eq((res ->> 'spent_minutes')::bigint, 140::bigint, 'spent: 30 + 60 + 50');
    PERFORM t.eq((res ->> 'accounts')::bigint, 6::bigint, 'members of 江翠');
    PERFORM t.eq((res ->> 'held_minutes')::bigint,
                 (SELECT sum(balance) FROM timebank.accounts WHERE community_id = 101 AND kind = 'person'),
                 'held minutes');
    PERFORM t.eq((res ->> 'records_pending')::bigint, 3::bigint, 'pending records');
    res := t.okr('get_totals', '{}', t.at(7), 'city totals');
    PERFORM t.eq((res ->> 'accounts')::bigint, 10::bigint, 'city: every member');
    PERFORM t.eq((res ->> 'held_minutes')::bigint,
                 (SELECT sum(balance) FROM timebank.accounts WHERE kind = 'person'), 'city: held');
    PERFORM t.err('get_totals', '{"community_id": 195}', t.at(7), 'not_found', 'totals of nowhere');

    -- list of records waiting for an organiser
    res := t.okr('list_records', '{"community_id": 101, "state": "pending"}', t.at(7), 'pending list');
    PERFORM t.eq(jsonb_array_length(res -> 'records'), 3, 'three pending');
    PERFORM t.err('list_records', '{"community_id": 101, "state": "lost"}', t.at(7),
                  'invalid_argument', 'unknown state');
    PERFORM t.err('list_records', '{}', t.at(7), 'invalid_argument', 'list of everything');

    -- history by activity and field
    res := t.okr('get_history', '{"person_id": 204}', t.at(7), 'history');
    PERFORM t.eq((res ->> 'total_minutes')::bigint, 90::bigint, 'history: credited minutes');
    PERFORM t.eq(res -> 'items' -> 0 ->> 'title', '邻里敲门乐', 'history: by activity');
    PERFORM t.err('get_history', '{"person_id": 995}', t.at(7), 'not_found', 'history of nobody');
END
$$;

-- ---------------------------------------------------------------- stars

DO $$
DECLARE
    res  jsonb;
    e    bigint;
BEGIN
    PERFORM t.okr('set_rules', jsonb_build_object('actor_id', 201, 'reason', 'festival stars',
                  'rules', t.rules(101, '{"star_hours": [1, 2, 100], "approval_levels": 1}')),
                  t.at(7), 'low star levels');
    e := t.eid();
    PERFORM t.okr('approve_hours', jsonb_build_object('actor_id', 202, 'record_id', t.id('rec2')),
                  t.at(7), 'approve the proposal');
    PERFORM t.eq(t.events(e), ARRAY['hours_reviewed', 'credited', 'star_reached'],
                 'a star reached is an event');
    PERFORM t.eq((t.payload(e, 'star_reached') ->> 'stars')::int, 2, 'two stars: 150 minutes');
    res := t.okr('get_balance', '{"person_id": 204}', t.at(7), 'balance with stars');
    PERFORM t.eq((res ->> 'stars')::int, 2, 'balance: stars');
    PERFORM t.eq((res ->> 'earned_minutes')::bigint, 150::bigint, 'balance: earned');
    PERFORM t.eq((res ->> 'next_star_minutes')::bigint, 5850::bigint, 'balance: to the next star');
END
$$;

-- ---------------------------------------------------------------- check-ins

DO $$
DECLARE
    e    bigint := t.eid();
    rec  timebank.records;
BEGIN
    -- Teacher Chen checks in at the classroom (新中, 3 h) and is checked out
    -- automatically 4 hours later: 180 minutes, for review
    PERFORM t.ev('checked_in', jsonb_build_object('checkin_id', 501, 'activity_id', 302,
                 'person_id', 203, 'community_id', 102, 'at', t.at(2, 14)));
    -- a resident attends; attending is not service
    PERFORM t.ev('checked_in', jsonb_build_object('checkin_id', 502, 'activity_id', 302,
                 'person_id', 209, 'community_id', 102, 'at', t.at(2, 14)));
    -- a stamp at a route station is not service either
    PERFORM t.ev('checked_in', jsonb_build_object('checkin_id', 503, 'station_id', 9,
                 'person_id', 204, 'community_id', 101, 'at', t.at(2, 14)));
    PERFORM t.eq((SELECT count(*) FROM timebank.open_stays), 1::bigint, 'one volunteer stay');
    PERFORM t.ev('checked_out', jsonb_build_object('checkin_id', 501, 'activity_id', 302,
                 'person_id', 203, 'community_id', 102, 'at', t.at(2, 18), 'automatic', true));
    PERFORM t.ev('checked_out', jsonb_build_object('checkin_id', 502, 'activity_id', 302,
                 'person_id', 209, 'community_id', 102, 'at', t.at(2, 15)));
    SELECT * INTO rec FROM timebank.records WHERE checkin_id = 501;
    PERFORM t.eq(rec.minutes, 180, 'capped at the scheduled three hours');
    PERFORM t.eq(rec.community_id, 102::bigint, 'the activity''s community');
    PERFORM t.eq(rec.state, 'pending', 'a proposal waits for approval');
    PERFORM t.ok(rec.needs_review, 'marked for review');
    PERFORM t.ok(rec.reason LIKE '%scheduled length%' AND rec.reason LIKE '%automatic%',
                 'review reasons: ' || rec.reason);
    PERFORM t.eq(rec.source, 'checkin', 'source: check-in');
    PERFORM t.eq((SELECT count(*) FROM timebank.records WHERE source = 'checkin'), 1::bigint,
                 'no record for the resident');
    PERFORM t.eq(t.events(e), ARRAY['hours_recorded'], 'the proposal is an event');
    PERFORM t.eq((SELECT count(*) FROM timebank.open_stays), 0::bigint, 'stay closed');
    -- a second check-out of the same check-in proposes nothing
    PERFORM t.ev('checked_out', jsonb_build_object('checkin_id', 501, 'activity_id', 302,
                 'person_id', 203, 'community_id', 102, 'at', t.at(2, 19)));
    PERFORM t.eq((SELECT count(*) FROM timebank.records WHERE source = 'checkin'), 1::bigint,
                 'one proposal per check-in');
    -- approved by 新中's organiser: paid from 新中's pool into a 江翠 account
    PERFORM t.okr('approve_hours', jsonb_build_object('actor_id', 207, 'record_id', rec.id),
                  t.at(3), 'approve across communities');
    PERFORM t.eq(t.sys(102, 'pool'), -180::bigint, '新中 pool pays');
    PERFORM t.eq(t.sys(102, 'clearing') + t.sys(101, 'clearing'), 0::bigint,
                 'clearing positions net to zero');
    PERFORM t.invariants('after check-ins');
END
$$;

-- ---------------------------------------------------------------- certificates

DO $$
DECLARE
    res   jsonb;
    v     jsonb;
    r     timebank.cmd_result;
    e     bigint := t.eid();
BEGIN
    PERFORM t.err('issue_certificate', '{"actor_id": 203, "person_id": 203, "holder_name": "陈老师", "id_number": "440703198001011234"}',
                  t.at(8), 'forbidden', 'a volunteer certifies themselves');
    PERFORM t.err('issue_certificate', '{"actor_id": 201, "person_id": 206, "holder_name": "陈奶奶", "id_number": "440703194501011234"}',
                  t.at(8), 'nothing_to_certify', 'no verified hours');
    PERFORM t.err('issue_certificate', '{"actor_id": 201, "person_id": 203, "holder_name": "", "id_number": "440703198001011234"}',
                  t.at(8), 'invalid_argument', 'no holder name');
    PERFORM t.err('issue_certificate', E'{"actor_id": 201, "person_id": 203, "holder_name": "陈老师\\n**************1234", "id_number": "440703198001011234"}',
                  t.at(8), 'invalid_argument', 'a line break in the name');
    PERFORM t.err('issue_certificate', '{"actor_id": 201, "person_id": 203, "holder_name": "陈老师", "id_number": "44-07"}',
                  t.at(8), 'invalid_argument', 'bad id number');
    PERFORM t.err('issue_certificate', jsonb_build_object('actor_id', 201, 'person_id', 203,
                  'holder_name', '陈老师', 'id_number', '440703198001011234', 'from', t.at(9)),
                  t.at(8), 'invalid_period', 'period backwards');
    res := t.okr('issue_certificate', '{"actor_id": 201, "person_id": 203, "holder_name": "陈老师", "id_number": "44070319800101123x"}',
                 t.at(8), 'issue a certificate');
    PERFORM t.ok(res ->> 'number' ~ '^LX-2026-[0-9]{6}$', 'certificate number ' || (res ->> 'number'));
    PERFORM t.eq(res ->> 'id_number_masked', '**************123X', 'only the last four kept');
    PERFORM t.eq((res ->> 'total_minutes')::bigint, 180::bigint,
                 'the credit that stands, not the reversed one');
    PERFORM t.eq(res ->> 'issuer', '江翠社区', 'issuer');
    PERFORM t.eq((res ->> 'movements')::int, 1, 'covers one movement');
    PERFORM t.eq(res -> 'periods' -> 0 ->> 'month', '2026-07', 'by month');
    PERFORM t.ok(res -> 'periods' -> 0 ->> 'content' LIKE '%邻里共享课堂%', 'service content');
    PERFORM t.ok(length(res ->> 'digest') = 64, 'a SHA-256 digest');
    PERFORM t.eq(t.events(e), ARRAY['certificate_issued'], 'certificate_issued event');
    PERFORM t.ok(NOT (t.payload(e, 'certificate_issued') ? 'holder_name'), 'no name in the event');

    v := t.okr('verify_certificate', jsonb_build_object('code', (res ->> 'number') || '-ABCDEFGHIJKLMNOP'),
               t.at(9), 'verify');
    PERFORM t.eq(v ->> 'digest', res ->> 'digest', 'verify: the same digest from the ledger');
    PERFORM t.eq(v ->> 'holder_name', '陈老师', 'verify: the content');
    PERFORM t.eq((v ->> 'reversed_minutes')::bigint, 0::bigint, 'verify: nothing reversed');
    v := t.okr('verify_certificate', '{"code": "LX-2026-999999-ABCDEFGHIJKLMNOP"}', t.at(9),
               'verify an unknown number');
    PERFORM t.ok(NOT (v ->> 'valid')::boolean AND v ->> 'problem' LIKE '%no certificate%',
                 'unknown number: not valid');
    v := t.okr('verify_certificate', '{"code": "hello"}', t.at(9), 'verify garbage');
    PERFORM t.ok(NOT (v ->> 'valid')::boolean AND v ->> 'problem' LIKE '%not a certificate code%',
                 'garbage: not valid');

    -- reversing a covered credit shows on verification
    PERFORM t.okr('reverse', jsonb_build_object('actor_id', 207,
                  'transfer_id', (SELECT transfer_id FROM timebank.records WHERE checkin_id = 501),
                  'reason', 'duplicate of a manual record'), t.at(9), 'reverse a certified credit');
    v := t.okr('verify_certificate', jsonb_build_object('code', (res ->> 'number') || '-ABCDEFGHIJKLMNOP'),
               t.at(9), 'verify after a reversal');
    PERFORM t.eq((v ->> 'reversed_minutes')::bigint, 180::bigint, 'verify: reversed minutes shown');
    PERFORM t.ok(v ->> 'problem' LIKE '180 of the 180 minutes%reversed%', 'verify: a reversal is a problem');
    PERFORM t.eq(v ->> 'digest', res ->> 'digest', 'verify: the certified content still matches');
    PERFORM t.invariants('at the end');
END
$$;

-- Statements add up even when entries were committed out of their dates'
-- order (two batches on two connections): opening + lines = closing.
DO $$
DECLARE
    res   jsonb;
    w     integer;
BEGIN
    PERFORM t.okr('spend', '{"person_id": 208, "minutes": 7, "service": "repair"}',
                  t.at(10, 2), 'a spend dated later');
    PERFORM t.okr('spend', '{"person_id": 208, "minutes": 5, "service": "repair"}',
                  t.at(10, 1), 'committed after it, dated earlier');
    FOR w IN 0 .. 3 LOOP
        res := t.okr('get_statement', jsonb_build_object('person_id', 208,
                     'from', t.at(10, 0.5 + w * 0.5), 'to', t.at(11)), t.at(12), 'statement window');
        PERFORM t.eq((res ->> 'opening_balance')::bigint
                     + coalesce((SELECT sum((x ->> 'amount')::bigint)
                                   FROM jsonb_array_elements(res -> 'lines') x), 0),
                     (res ->> 'closing_balance')::bigint,
                     format('window %s: opening + lines = closing', w));
    END LOOP;
END
$$;

-- the stream: gap-free numbers, in the order written
DO $$
BEGIN
    PERFORM t.eq((SELECT max(seq) - min(seq) + 1 FROM timebank.outbox), (SELECT count(*) FROM timebank.outbox),
                 'event numbers are gap-free');
    PERFORM t.eq((SELECT count(*) FROM timebank.outbox WHERE payload::text ~ '陈'), 0::bigint,
                 'no names in events');
END
$$;

\pset tuples_only on
\pset format unaligned
SELECT 'timebank_test: ' || count(*) || ' checks passed' FROM t.passed;
