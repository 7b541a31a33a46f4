-- Timebank command functions. The daemon sends batches of commands,
--     SELECT i, code, message, result FROM timebank.exec_batch($1::jsonb)
-- (common/sqlcmd.h), and each runs through timebank.exec(name, key, args,
-- ctx). The rules of the registry's functions hold here too:
--   * bad input never raises: it returns a stable error code, and an error
--     reply changes nothing (every check runs before the first write);
--   * business time is ctx.now (ms), never now();
--   * every change writes its events to timebank.outbox in the same
--     transaction; payloads carry ids and minutes, never names;
--   * with an idempotency key the first reply is stored with the change.
--
-- Money rules. Amounts are whole minutes, 1 .. 60,000,000 (a million hours)
-- per movement. A movement locks the rows of every account it touches in id
-- order (so two movements never deadlock) and checks, under those locks,
-- that no member account goes below its community's overdraft limit:
-- concurrent spends cannot overdraw. Rules are read FOR SHARE and changed
-- FOR UPDATE, so a movement and a rule change never interleave.
--
-- Who may do what: an organiser of a community records, approves and
-- declines its hours (never their own), reverses its movements, sets its
-- rules and issues its certificates. A volunteer may propose their own hours
-- and links family. actor_id names who acts; authenticating that claim is
-- the front door's job (CURVE client keys, API keys), not this schema's.

-- ------------------------------------------------------------ arg helpers

-- A JSON integer that fits bigint, else NULL (see registry.s_jint).
CREATE FUNCTION timebank.s_jint(v jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(v) IS DISTINCT FROM 'number' THEN NULL
        WHEN v::numeric % 1 <> 0 THEN NULL
        WHEN v::numeric < -9223372036854775808 OR v::numeric > 9223372036854775807 THEN NULL
        ELSE v::numeric::bigint
    END
$$;

-- args[k] as bigint: 0 when absent or null, NULL when not an integer.
CREATE FUNCTION timebank.s_int(p jsonb, k text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN 0
        WHEN jsonb_typeof(p -> k) = 'null' THEN 0
        ELSE timebank.s_jint(p -> k)
    END
$$;

-- args[k] as text: '' when absent or null, NULL when not a string.
CREATE FUNCTION timebank.s_text(p jsonb, k text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN ''
        WHEN jsonb_typeof(p -> k) = 'null' THEN ''
        WHEN jsonb_typeof(p -> k) = 'string' THEN p ->> k
        ELSE NULL
    END
$$;

-- args[k] as integer[]: '{}' when absent or null, NULL when not an array of
-- integers in 0..2^31-1.
CREATE FUNCTION timebank.s_int_array(p jsonb, k text) RETURNS integer[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN '{}'::integer[]
        WHEN jsonb_typeof(p -> k) = 'null' THEN '{}'::integer[]
        WHEN jsonb_typeof(p -> k) <> 'array' THEN NULL
        ELSE (SELECT CASE WHEN coalesce(bool_and(timebank.s_jint(e) BETWEEN 0 AND 2147483647),
                                        true)
                          THEN coalesce(array_agg(timebank.s_jint(e)::integer ORDER BY i), '{}')
                     END
                FROM jsonb_array_elements(p -> k) WITH ORDINALITY AS t (e, i))
    END
$$;

CREATE FUNCTION timebank.s_now(p_ctx jsonb) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(timebank.s_jint(p_ctx -> 'now'),
                    (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
$$;

CREATE FUNCTION timebank.s_err(p_code text, p_message text) RETURNS timebank.cmd_result
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW(p_code, p_message, '{}'::jsonb)::timebank.cmd_result
$$;

CREATE FUNCTION timebank.s_ok(p_message text, p_result jsonb) RETURNS timebank.cmd_result
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW('ok', p_message, p_result)::timebank.cmd_result
$$;

-- A day (date) of ms p_at in time zone p_tz.
CREATE FUNCTION timebank.s_day(p_at bigint, p_tz text) RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT (to_timestamp(p_at / 1000.0) AT TIME ZONE p_tz)::date
$$;

-- ------------------------------------------------------------ events

-- The stream's write turn (see registry.s_outbox_turn).
CREATE FUNCTION timebank.s_outbox_turn() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM timebank.outbox_stream WHERE stream = 'timebank' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox stream timebank is missing' USING ERRCODE = 'P0002';
    END IF;
    RETURN coalesce((SELECT max(seq) FROM timebank.outbox WHERE stream = 'timebank'), 0);
END
$$;

CREATE FUNCTION timebank.s_emit(p_type text, p_community_id bigint, p_occurred_at bigint,
                                p_payload jsonb, p_ctx jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO timebank.outbox (seq, type, community_id, trace_id, occurred_at, payload)
    VALUES (timebank.s_outbox_turn() + 1, p_type, p_community_id,
            coalesce(p_ctx ->> 'trace_id', ''), p_occurred_at, p_payload::json);
END
$$;

-- ------------------------------------------------------------ lookups

CREATE FUNCTION timebank.s_is_organiser(p_person bigint, p_community bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM timebank.people
                    WHERE id = p_person AND community_id = p_community AND organiser)
$$;

CREATE FUNCTION timebank.s_person_account(p_person bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM timebank.accounts WHERE person_id = p_person AND kind = 'person'
$$;

-- (kind <> 'person' lets the planner use the partial index for any p_kind)
CREATE FUNCTION timebank.s_system_account(p_community bigint, p_kind text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM timebank.accounts
     WHERE community_id = p_community AND kind = p_kind AND kind <> 'person'
$$;

-- Stars reached with p_earned minutes under thresholds p_hours.
CREATE FUNCTION timebank.s_stars(p_earned bigint, p_hours integer[]) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT count(*)::integer FROM unnest(p_hours) h WHERE p_earned >= h::bigint * 60
$$;

CREATE FUNCTION timebank.s_rules_json(r timebank.rules) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'community_id', r.community_id, 'overdraft_minutes', r.overdraft_minutes,
        'max_record_minutes', r.max_record_minutes, 'max_day_minutes', r.max_day_minutes,
        'min_held_minutes', r.min_held_minutes, 'gift_policy', r.gift_policy,
        'approval_levels', r.approval_levels, 'star_hours', to_jsonb(r.star_hours),
        'timezone', r.timezone, 'changed_at', r.changed_at, 'changed_by', r.changed_by)
$$;

-- A community the timebank has not heard of yet gets its pool, clearing
-- account and default rules (their creation is logged as the defaults).
CREATE FUNCTION timebank.s_community_ensure(p_id bigint, p_name text, p_district text,
                                            p_at bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO timebank.communities (id, name, district, created_at)
    VALUES (p_id, p_name, p_district, p_at)
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, district = excluded.district
        WHERE excluded.name <> '';
    IF NOT EXISTS (SELECT 1 FROM timebank.rules WHERE community_id = p_id) THEN
        INSERT INTO timebank.accounts (kind, community_id, created_at)
        VALUES ('pool', p_id, p_at), ('clearing', p_id, p_at);
        INSERT INTO timebank.rules (community_id, changed_at) VALUES (p_id, p_at);
        INSERT INTO timebank.rule_log (community_id, actor_id, at, reason, new_rules)
        SELECT p_id, 0, p_at, 'defaults', timebank.s_rules_json(r)
          FROM timebank.rules r WHERE r.community_id = p_id;
    END IF;
END
$$;

-- ------------------------------------------------------------ the ledger

-- The legs of a movement of p_minutes from account p_from to p_to: two
-- entries within one community; four across communities, through both
-- communities' clearing accounts, so each community's clearing balance is
-- its net position towards the others.
CREATE FUNCTION timebank.s_legs(p_from bigint, p_to bigint, p_minutes bigint,
                                OUT accounts bigint[], OUT amounts bigint[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_fc bigint;
    v_tc bigint;
BEGIN
    SELECT community_id INTO v_fc FROM timebank.accounts WHERE id = p_from;
    SELECT community_id INTO v_tc FROM timebank.accounts WHERE id = p_to;
    IF v_fc = v_tc THEN
        accounts := ARRAY[p_from, p_to];
        amounts := ARRAY[-p_minutes, p_minutes];
    ELSE
        accounts := ARRAY[p_from, timebank.s_system_account(v_fc, 'clearing'),
                          timebank.s_system_account(v_tc, 'clearing'), p_to];
        amounts := ARRAY[-p_minutes, p_minutes, -p_minutes, p_minutes];
    END IF;
END
$$;

-- Posts one movement: locks its accounts in id order, checks that no member
-- account goes below its limit (and, with p_min_held > 0, that the payer
-- held at least that much before), then writes the transfer, its entries
-- and the new balances. code is 'ok' or an error code with nothing written.
CREATE FUNCTION timebank.s_post(p_kind text, p_from bigint, p_to bigint, p_minutes bigint,
                                p_accounts bigint[], p_amounts bigint[], p_at bigint,
                                p_actor bigint, p_record bigint, p_reverses bigint,
                                p_memo text, p_key text, p_min_held bigint,
                                OUT code text, OUT transfer_id bigint,
                                OUT from_balance bigint, OUT to_balance bigint)
LANGUAGE plpgsql AS $$
DECLARE
    a        record;
    v_i      integer;
    v_after  bigint;
    v_bal    bigint[];
BEGIN
    PERFORM 1 FROM timebank.accounts WHERE id = ANY (p_accounts) ORDER BY id FOR NO KEY UPDATE;
    FOR v_i IN 1 .. cardinality(p_accounts) LOOP
        SELECT ac.kind, ac.balance,
               (SELECT ru.overdraft_minutes FROM timebank.rules ru
                 WHERE ru.community_id = ac.community_id) AS overdraft_minutes
          INTO a
          FROM timebank.accounts ac
         WHERE ac.id = p_accounts[v_i];
        IF NOT FOUND THEN
            code := 'not_found';
            RETURN;
        END IF;
        v_after := a.balance + p_amounts[v_i];
        IF v_after NOT BETWEEN -4000000000000000000 AND 4000000000000000000 THEN
            code := 'out_of_range';
            RETURN;
        END IF;
        IF a.kind = 'person' AND p_amounts[v_i] < 0 THEN
            IF v_after < -a.overdraft_minutes THEN
                code := 'insufficient_balance';
                RETURN;
            END IF;
            IF p_min_held > 0 AND a.balance < p_min_held THEN
                code := 'below_min_held';
                RETURN;
            END IF;
        END IF;
    END LOOP;
    INSERT INTO timebank.transfers (kind, at, minutes, from_account, to_account, actor_id,
                                    record_id, reverses_id, memo, command_key)
    VALUES (p_kind, p_at, p_minutes, p_from, p_to, p_actor, p_record, p_reverses, p_memo,
            nullif(p_key, ''))
    RETURNING id INTO transfer_id;
    v_bal := '{}';
    FOR v_i IN 1 .. cardinality(p_accounts) LOOP
        UPDATE timebank.accounts SET balance = balance + p_amounts[v_i]
         WHERE id = p_accounts[v_i]
        RETURNING balance INTO v_after;
        v_bal := v_bal || v_after;
        IF p_accounts[v_i] = p_from THEN from_balance := v_after; END IF;
        IF p_accounts[v_i] = p_to THEN to_balance := v_after; END IF;
    END LOOP;
    INSERT INTO timebank.entries (transfer_id, account_id, amount, balance, at)
    SELECT transfer_id, x.acc, x.amt, x.bal, p_at
      FROM unnest(p_accounts, p_amounts, v_bal) AS x (acc, amt, bal);
    code := 'ok';
END
$$;

-- The Movement event of a posted transfer.
CREATE FUNCTION timebank.s_emit_movement(p_transfer bigint, p_ctx jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t  record;
BEGIN
    -- scalar subqueries: one primary-key probe each, whatever the planner
    -- believes about the tables' sizes
    SELECT tr.*,
           (SELECT person_id FROM timebank.accounts WHERE id = tr.from_account) AS fp,
           (SELECT person_id FROM timebank.accounts WHERE id = tr.to_account) AS tp,
           (SELECT community_id FROM timebank.accounts WHERE id = tr.from_account) AS fc,
           (SELECT community_id FROM timebank.accounts WHERE id = tr.to_account) AS tc
      INTO t
      FROM timebank.transfers tr
     WHERE tr.id = p_transfer;
    PERFORM timebank.s_emit(
        CASE t.kind WHEN 'credit' THEN 'credited' WHEN 'gift' THEN 'gifted'
                    WHEN 'spend' THEN 'spent' ELSE 'reversed' END,
        CASE WHEN t.kind = 'credit' THEN t.tc ELSE t.fc END, t.at,
        jsonb_build_object('transfer_id', t.id, 'kind', t.kind,
            'from_account_id', t.from_account, 'to_account_id', t.to_account,
            'from_person_id', coalesce(t.fp, 0), 'to_person_id', coalesce(t.tp, 0),
            'from_community_id', t.fc, 'to_community_id', t.tc, 'minutes', t.minutes,
            'record_id', coalesce(t.record_id, 0), 'reverses_id', coalesce(t.reverses_id, 0),
            'at', t.at),
        p_ctx);
END
$$;

CREATE FUNCTION timebank.s_transfer_result(p_transfer bigint, p_from_balance bigint,
                                           p_to_balance bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('transfer_id', t.id, 'kind', t.kind,
               'from_account_id', t.from_account, 'to_account_id', t.to_account,
               'from_balance', p_from_balance, 'to_balance', p_to_balance,
               'minutes', t.minutes)
      FROM timebank.transfers t WHERE t.id = p_transfer
$$;

-- Adds p_minutes (negative on a reversal) to a person's earned minutes and
-- updates the stars; reaching a new level is an event.
CREATE FUNCTION timebank.s_earn(p_account bigint, p_minutes bigint, p_now bigint, p_ctx jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a        record;
    v_stars  integer;
BEGIN
    UPDATE timebank.accounts SET earned = earned + p_minutes WHERE id = p_account
    RETURNING person_id, community_id, earned, stars INTO a;
    SELECT timebank.s_stars(a.earned, r.star_hours) INTO v_stars
      FROM timebank.rules r WHERE r.community_id = a.community_id;
    IF v_stars IS DISTINCT FROM a.stars THEN
        UPDATE timebank.accounts SET stars = v_stars WHERE id = p_account;
        IF v_stars > a.stars THEN
            PERFORM timebank.s_emit('star_reached', a.community_id, p_now,
                jsonb_build_object('person_id', a.person_id, 'community_id', a.community_id,
                                   'stars', v_stars, 'earned_minutes', a.earned),
                p_ctx);
        END IF;
    END IF;
END
$$;

-- ------------------------------------------------------------ hour records

CREATE FUNCTION timebank.s_record_json(r timebank.records) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('record_id', r.id, 'state', r.state, 'approvals', r.approvals,
                              'levels', r.levels, 'transfer_id', coalesce(r.transfer_id, 0),
                              'needs_review', r.needs_review)
$$;

-- Minutes a person already has on a day in records that still count.
CREATE FUNCTION timebank.s_day_minutes(p_person bigint, p_day date, p_except bigint)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(minutes), 0) FROM timebank.records
     WHERE person_id = p_person AND day = p_day AND id <> p_except
       AND state IN ('pending', 'approved', 'credited')
$$;

CREATE FUNCTION timebank.cmd_record_hours(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now      bigint := timebank.s_now(p_ctx);
    v_actor    bigint := timebank.s_int(p_args, 'actor_id');
    v_person   bigint := timebank.s_int(p_args, 'person_id');
    v_act_id   bigint := timebank.s_int(p_args, 'activity_id');
    v_comm     bigint := timebank.s_int(p_args, 'community_id');
    v_minutes  bigint := timebank.s_int(p_args, 'minutes');
    v_start    bigint := timebank.s_int(p_args, 'started_at');
    v_field    text := timebank.s_text(p_args, 'field');
    v_content  text := timebank.s_text(p_args, 'content');
    v_p        timebank.people;
    v_a        timebank.activities;
    v_r        timebank.rules;
    v_day      date;
    v_rec      timebank.records;
BEGIN
    IF v_actor IS NULL OR v_person IS NULL OR v_act_id IS NULL OR v_comm IS NULL
       OR v_minutes IS NULL OR v_start IS NULL OR v_field IS NULL OR v_content IS NULL THEN
        RETURN timebank.s_err('invalid_argument', 'An argument has the wrong type.');
    END IF;
    IF v_actor <= 0 OR v_person <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and person_id are required.');
    END IF;
    IF v_start <= 0 OR v_start > v_now + 300000 THEN
        RETURN timebank.s_err('invalid_argument', 'started_at must be a time that has passed.');
    END IF;
    IF octet_length(v_field) > 64 OR octet_length(v_content) > 500 THEN
        RETURN timebank.s_err('invalid_argument',
            'field holds at most 64 bytes and content at most 500.');
    END IF;
    SELECT * INTO v_p FROM timebank.people WHERE id = v_person;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    IF v_act_id > 0 THEN
        SELECT * INTO v_a FROM timebank.activities WHERE id = v_act_id;
        IF NOT FOUND THEN
            RETURN timebank.s_err('not_found', 'No such activity.');
        END IF;
        IF v_comm <> 0 AND v_comm <> v_a.community_id THEN
            RETURN timebank.s_err('invalid_argument',
                'community_id is not the community of the activity.');
        END IF;
        v_comm := v_a.community_id;
    ELSIF v_comm = 0 THEN
        v_comm := v_p.community_id;
    END IF;
    SELECT * INTO v_r FROM timebank.rules WHERE community_id = v_comm FOR SHARE;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such community.');
    END IF;
    IF v_actor <> v_person AND NOT timebank.s_is_organiser(v_actor, v_comm) THEN
        RETURN timebank.s_err('forbidden',
            'Only the volunteer or an organiser of the community may record these hours.');
    END IF;
    IF v_minutes < 1 THEN
        RETURN timebank.s_err('invalid_amount', 'minutes must be at least 1.');
    END IF;
    IF v_minutes > v_r.max_record_minutes THEN
        RETURN timebank.s_err('record_limit',
            format('A record holds at most %s minutes in this community.', v_r.max_record_minutes));
    END IF;
    v_day := timebank.s_day(v_start, v_r.timezone);
    IF timebank.s_day_minutes(v_person, v_day, 0) + v_minutes > v_r.max_day_minutes THEN
        RETURN timebank.s_err('day_limit',
            format('This would make more than %s minutes on %s.', v_r.max_day_minutes, v_day));
    END IF;
    INSERT INTO timebank.records (person_id, community_id, activity_id, minutes, started_at, day,
                                  field, content, source, levels, created_by, created_at)
    VALUES (v_person, v_comm, v_act_id, v_minutes, v_start, v_day, v_field, v_content,
            'manual', v_r.approval_levels, v_actor, v_now)
    RETURNING * INTO v_rec;
    INSERT INTO timebank.record_log (record_id, at, actor_id, state)
    VALUES (v_rec.id, v_now, v_actor, 'pending');
    PERFORM timebank.s_emit('hours_recorded', v_comm, v_now,
        jsonb_build_object('record_id', v_rec.id, 'person_id', v_person, 'community_id', v_comm,
                           'activity_id', v_act_id, 'minutes', v_minutes, 'source', 'manual',
                           'needs_review', false),
        p_ctx);
    RETURN timebank.s_ok('', timebank.s_record_json(v_rec));
END
$$;

CREATE FUNCTION timebank.cmd_approve_hours(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now     bigint := timebank.s_now(p_ctx);
    v_actor   bigint := timebank.s_int(p_args, 'actor_id');
    v_id      bigint := timebank.s_int(p_args, 'record_id');
    v_rec     timebank.records;
    v_r       timebank.rules;
    v_pool    bigint;
    v_acct    bigint;
    v_legs    record;
    v_post    record;
BEGIN
    IF v_actor IS NULL OR v_id IS NULL OR v_actor <= 0 OR v_id <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and record_id are required.');
    END IF;
    SELECT * INTO v_rec FROM timebank.records WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such hour record.');
    END IF;
    IF v_rec.state IN ('credited', 'reversed') THEN
        RETURN timebank.s_err('already_credited', 'These hours were already verified and credited.');
    END IF;
    IF v_rec.state = 'declined' THEN
        RETURN timebank.s_err('record_declined', 'These hours were declined.');
    END IF;
    IF v_actor = v_rec.person_id THEN
        RETURN timebank.s_err('self_approval', 'Nobody may approve their own hours.');
    END IF;
    IF NOT timebank.s_is_organiser(v_actor, v_rec.community_id) THEN
        RETURN timebank.s_err('forbidden',
            'Only an organiser of the community may approve its hours.');
    END IF;
    IF EXISTS (SELECT 1 FROM timebank.record_log
                WHERE record_id = v_id AND actor_id = v_actor AND state = 'approved') THEN
        RETURN timebank.s_err('already_approved',
            'You approved these hours already; the next level needs another organiser.');
    END IF;
    SELECT * INTO v_r FROM timebank.rules WHERE community_id = v_rec.community_id FOR SHARE;
    IF timebank.s_day_minutes(v_rec.person_id, v_rec.day, v_rec.id) + v_rec.minutes
       > v_r.max_day_minutes THEN
        RETURN timebank.s_err('day_limit',
            format('This would make more than %s minutes on %s.', v_r.max_day_minutes, v_rec.day));
    END IF;
    IF v_rec.minutes > v_r.max_record_minutes THEN
        RETURN timebank.s_err('record_limit',
            format('A record holds at most %s minutes in this community.', v_r.max_record_minutes));
    END IF;
    v_acct := timebank.s_person_account(v_rec.person_id);
    v_pool := timebank.s_system_account(v_rec.community_id, 'pool');
    IF v_rec.approvals + 1 >= v_rec.levels THEN
        v_legs := timebank.s_legs(v_pool, v_acct, v_rec.minutes);
        v_post := timebank.s_post('credit', v_pool, v_acct, v_rec.minutes, v_legs.accounts,
                                  v_legs.amounts, v_now, v_actor, v_rec.id, NULL, v_rec.field,
                                  p_ctx ->> 'key', 0);
        IF v_post.code <> 'ok' THEN
            RETURN timebank.s_err(v_post.code, 'The hours could not be credited.');
        END IF;
        UPDATE timebank.records SET approvals = approvals + 1, state = 'credited',
                                    transfer_id = v_post.transfer_id
         WHERE id = v_id RETURNING * INTO v_rec;
        INSERT INTO timebank.record_log (record_id, at, actor_id, state, level)
        VALUES (v_id, v_now, v_actor, 'approved', v_rec.approvals),
               (v_id, v_now, v_actor, 'credited', v_rec.approvals);
        PERFORM timebank.s_emit('hours_reviewed', v_rec.community_id, v_now,
            jsonb_build_object('record_id', v_id, 'person_id', v_rec.person_id,
                               'community_id', v_rec.community_id, 'actor_id', v_actor,
                               'state', 'credited', 'level', v_rec.approvals),
            p_ctx);
        PERFORM timebank.s_emit_movement(v_post.transfer_id, p_ctx);
        PERFORM timebank.s_earn(v_acct, v_rec.minutes, v_now, p_ctx);
    ELSE
        UPDATE timebank.records SET approvals = approvals + 1, state = 'approved'
         WHERE id = v_id RETURNING * INTO v_rec;
        INSERT INTO timebank.record_log (record_id, at, actor_id, state, level)
        VALUES (v_id, v_now, v_actor, 'approved', v_rec.approvals);
        PERFORM timebank.s_emit('hours_reviewed', v_rec.community_id, v_now,
            jsonb_build_object('record_id', v_id, 'person_id', v_rec.person_id,
                               'community_id', v_rec.community_id, 'actor_id', v_actor,
                               'state', 'approved', 'level', v_rec.approvals),
            p_ctx);
    END IF;
    RETURN timebank.s_ok('', timebank.s_record_json(v_rec));
END
$$;

CREATE FUNCTION timebank.cmd_decline_hours(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now     bigint := timebank.s_now(p_ctx);
    v_actor   bigint := timebank.s_int(p_args, 'actor_id');
    v_id      bigint := timebank.s_int(p_args, 'record_id');
    v_reason  text := timebank.s_text(p_args, 'reason');
    v_rec     timebank.records;
BEGIN
    IF v_actor IS NULL OR v_id IS NULL OR v_actor <= 0 OR v_id <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and record_id are required.');
    END IF;
    IF v_reason IS NULL OR octet_length(v_reason) NOT BETWEEN 1 AND 500 THEN
        RETURN timebank.s_err('invalid_argument', 'A reason of 1 to 500 bytes is required.');
    END IF;
    SELECT * INTO v_rec FROM timebank.records WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such hour record.');
    END IF;
    IF v_rec.state IN ('credited', 'reversed') THEN
        RETURN timebank.s_err('already_credited',
            'These hours were credited; reverse the movement instead.');
    END IF;
    IF v_rec.state = 'declined' THEN
        RETURN timebank.s_err('record_declined', 'These hours were declined already.');
    END IF;
    IF v_actor = v_rec.person_id THEN
        RETURN timebank.s_err('self_approval', 'Nobody may review their own hours.');
    END IF;
    IF NOT timebank.s_is_organiser(v_actor, v_rec.community_id) THEN
        RETURN timebank.s_err('forbidden',
            'Only an organiser of the community may decline its hours.');
    END IF;
    UPDATE timebank.records SET state = 'declined', reason = v_reason
     WHERE id = v_id RETURNING * INTO v_rec;
    INSERT INTO timebank.record_log (record_id, at, actor_id, state, reason)
    VALUES (v_id, v_now, v_actor, 'declined', v_reason);
    PERFORM timebank.s_emit('hours_reviewed', v_rec.community_id, v_now,
        jsonb_build_object('record_id', v_id, 'person_id', v_rec.person_id,
                           'community_id', v_rec.community_id, 'actor_id', v_actor,
                           'state', 'declined', 'reason', v_reason),
        p_ctx);
    RETURN timebank.s_ok('', timebank.s_record_json(v_rec));
END
$$;

-- ------------------------------------------------------------ movements

-- Checks an amount of minutes; NULL when fine, else the error.
CREATE FUNCTION timebank.s_check_minutes(p_minutes bigint) RETURNS timebank.cmd_result
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_minutes IS NULL THEN timebank.s_err('invalid_argument', 'minutes must be an integer.')
        WHEN p_minutes < 1 THEN timebank.s_err('invalid_amount', 'minutes must be at least 1.')
        WHEN p_minutes > 60000000 THEN
            timebank.s_err('amount_too_large', 'A movement is at most 60,000,000 minutes.')
    END
$$;

CREATE FUNCTION timebank.cmd_gift(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now      bigint := timebank.s_now(p_ctx);
    v_from     bigint := timebank.s_int(p_args, 'from_person_id');
    v_to       bigint := timebank.s_int(p_args, 'to_person_id');
    v_minutes  bigint := timebank.s_int(p_args, 'minutes');
    v_memo     text := timebank.s_text(p_args, 'memo');
    v_fp       timebank.people;
    v_tp       timebank.people;
    v_policy   text;
    v_fa       bigint;
    v_ta       bigint;
    v_legs     record;
    v_post     record;
    v_bad      timebank.cmd_result := timebank.s_check_minutes(v_minutes);
BEGIN
    IF v_from IS NULL OR v_to IS NULL OR v_memo IS NULL OR v_from <= 0 OR v_to <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'from_person_id and to_person_id are required.');
    END IF;
    IF v_bad.code IS NOT NULL THEN
        RETURN v_bad;
    END IF;
    IF octet_length(v_memo) > 200 THEN
        RETURN timebank.s_err('invalid_argument', 'memo holds at most 200 bytes.');
    END IF;
    IF v_from = v_to THEN
        RETURN timebank.s_err('self_transfer', 'Hours cannot be gifted to oneself.');
    END IF;
    SELECT * INTO v_fp FROM timebank.people WHERE id = v_from;
    SELECT * INTO v_tp FROM timebank.people WHERE id = v_to;
    IF v_fp.id IS NULL OR v_tp.id IS NULL THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    -- a member's community is their account's (the lane reads the same)
    SELECT id, community_id INTO v_fa, v_fp.community_id FROM timebank.accounts
     WHERE person_id = v_from AND kind = 'person';
    SELECT id, community_id INTO v_ta, v_tp.community_id FROM timebank.accounts
     WHERE person_id = v_to AND kind = 'person';
    SELECT gift_policy INTO v_policy FROM timebank.rules
     WHERE community_id = v_fp.community_id FOR SHARE;
    IF v_policy = 'none' THEN
        RETURN timebank.s_err('gifts_not_allowed', 'This community does not allow gifts of hours.');
    ELSIF v_policy = 'community' AND v_tp.community_id <> v_fp.community_id THEN
        RETURN timebank.s_err('recipient_not_allowed',
            'This community allows gifts only to members of the same community.');
    ELSIF v_policy = 'family' AND NOT EXISTS (SELECT 1 FROM timebank.family
                                               WHERE person_id = v_from AND relative_id = v_to) THEN
        RETURN timebank.s_err('recipient_not_allowed',
            'This community allows gifts only to recorded family members.');
    END IF;
    v_legs := timebank.s_legs(v_fa, v_ta, v_minutes);
    v_post := timebank.s_post('gift', v_fa, v_ta, v_minutes, v_legs.accounts, v_legs.amounts,
                              v_now, v_from, NULL, NULL, v_memo, p_ctx ->> 'key', 0);
    IF v_post.code = 'insufficient_balance' THEN
        RETURN timebank.s_err(v_post.code, 'The gift would take the account below its limit.');
    ELSIF v_post.code <> 'ok' THEN
        RETURN timebank.s_err(v_post.code, 'The gift could not be posted.');
    END IF;
    PERFORM timebank.s_emit_movement(v_post.transfer_id, p_ctx);
    RETURN timebank.s_ok('', timebank.s_transfer_result(v_post.transfer_id, v_post.from_balance,
                                                        v_post.to_balance));
END
$$;

CREATE FUNCTION timebank.cmd_spend(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now      bigint := timebank.s_now(p_ctx);
    v_person   bigint := timebank.s_int(p_args, 'person_id');
    v_prov     bigint := timebank.s_int(p_args, 'provider_id');
    v_comm     bigint := timebank.s_int(p_args, 'community_id');
    v_minutes  bigint := timebank.s_int(p_args, 'minutes');
    v_service  text := timebank.s_text(p_args, 'service');
    v_memo     text := timebank.s_text(p_args, 'memo');
    v_p        timebank.people;
    v_fa       bigint;
    v_ta       bigint;
    v_held     bigint;
    v_legs     record;
    v_post     record;
    v_bad      timebank.cmd_result := timebank.s_check_minutes(v_minutes);
BEGIN
    IF v_person IS NULL OR v_prov IS NULL OR v_comm IS NULL OR v_service IS NULL
       OR v_memo IS NULL OR v_person <= 0 OR v_prov < 0 OR v_comm < 0 THEN
        RETURN timebank.s_err('invalid_argument', 'person_id is required; ids are positive.');
    END IF;
    IF v_bad.code IS NOT NULL THEN
        RETURN v_bad;
    END IF;
    IF octet_length(v_service) NOT BETWEEN 1 AND 64 OR octet_length(v_memo) > 200 THEN
        RETURN timebank.s_err('invalid_argument',
            'service holds 1 to 64 bytes and memo at most 200.');
    END IF;
    IF v_prov = v_person THEN
        RETURN timebank.s_err('self_transfer', 'Nobody pays themselves.');
    END IF;
    SELECT * INTO v_p FROM timebank.people WHERE id = v_person;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    -- a member's community is their account's (the lane reads the same)
    SELECT id, community_id INTO v_fa, v_p.community_id FROM timebank.accounts
     WHERE person_id = v_person AND kind = 'person';
    IF v_prov > 0 THEN
        IF v_comm <> 0 THEN
            RETURN timebank.s_err('invalid_argument',
                'community_id names a pool; a provider is paid directly.');
        END IF;
        v_ta := timebank.s_person_account(v_prov);
        IF v_ta IS NULL THEN
            RETURN timebank.s_err('not_found', 'No such provider.');
        END IF;
    ELSE
        v_ta := timebank.s_system_account(CASE WHEN v_comm = 0 THEN v_p.community_id
                                               ELSE v_comm END, 'pool');
        IF v_ta IS NULL THEN
            RETURN timebank.s_err('not_found', 'No such community.');
        END IF;
    END IF;
    SELECT min_held_minutes INTO v_held FROM timebank.rules
     WHERE community_id = v_p.community_id FOR SHARE;
    v_legs := timebank.s_legs(v_fa, v_ta, v_minutes);
    v_post := timebank.s_post('spend', v_fa, v_ta, v_minutes, v_legs.accounts, v_legs.amounts,
                              v_now, v_person, NULL, NULL,
                              CASE WHEN v_memo = '' THEN v_service
                                   ELSE v_service || ': ' || v_memo END,
                              p_ctx ->> 'key', v_held);
    IF v_post.code = 'insufficient_balance' THEN
        RETURN timebank.s_err(v_post.code, 'The spend would take the account below its limit.');
    ELSIF v_post.code = 'below_min_held' THEN
        RETURN timebank.s_err(v_post.code,
            format('This community lets members spend once they hold %s minutes.', v_held));
    ELSIF v_post.code <> 'ok' THEN
        RETURN timebank.s_err(v_post.code, 'The spend could not be posted.');
    END IF;
    PERFORM timebank.s_emit_movement(v_post.transfer_id, p_ctx);
    RETURN timebank.s_ok('', timebank.s_transfer_result(v_post.transfer_id, v_post.from_balance,
                                                        v_post.to_balance));
END
$$;

CREATE FUNCTION timebank.cmd_reverse(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now     bigint := timebank.s_now(p_ctx);
    v_actor   bigint := timebank.s_int(p_args, 'actor_id');
    v_id      bigint := timebank.s_int(p_args, 'transfer_id');
    v_reason  text := timebank.s_text(p_args, 'reason');
    v_t       timebank.transfers;
    v_fc      bigint;
    v_tc      bigint;
    v_legs    record;
    v_post    record;
BEGIN
    IF v_actor IS NULL OR v_id IS NULL OR v_actor <= 0 OR v_id <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and transfer_id are required.');
    END IF;
    IF v_reason IS NULL OR octet_length(v_reason) NOT BETWEEN 1 AND 500 THEN
        RETURN timebank.s_err('invalid_argument', 'A reason of 1 to 500 bytes is required.');
    END IF;
    SELECT * INTO v_t FROM timebank.transfers WHERE id = v_id;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such movement.');
    END IF;
    IF v_t.kind = 'reversal' THEN
        RETURN timebank.s_err('not_reversible',
            'A reversal is not reversed; post the movement again instead.');
    END IF;
    SELECT community_id INTO v_fc FROM timebank.accounts WHERE id = v_t.from_account;
    SELECT community_id INTO v_tc FROM timebank.accounts WHERE id = v_t.to_account;
    IF NOT timebank.s_is_organiser(v_actor, v_fc) AND NOT timebank.s_is_organiser(v_actor, v_tc) THEN
        RETURN timebank.s_err('forbidden',
            'Only an organiser of a community the movement touched may reverse it.');
    END IF;
    -- the lock on the accounts (in s_post) orders two reversals of one
    -- movement; the unique index on reverses_id is the last word
    IF EXISTS (SELECT 1 FROM timebank.transfers WHERE reverses_id = v_id) THEN
        RETURN timebank.s_err('already_reversed', 'This movement was reversed already.');
    END IF;
    -- the legs of the movement back: each of the original's legs negated
    v_legs := timebank.s_legs(v_t.to_account, v_t.from_account, v_t.minutes);
    v_post := timebank.s_post('reversal', v_t.to_account, v_t.from_account, v_t.minutes,
                              v_legs.accounts, v_legs.amounts, v_now, v_actor, v_t.record_id,
                              v_id, v_reason, p_ctx ->> 'key', 0);
    IF v_post.code = 'insufficient_balance' THEN
        RETURN timebank.s_err(v_post.code,
            'The reversal would take an account below its limit: its hours were used.');
    ELSIF v_post.code <> 'ok' THEN
        RETURN timebank.s_err(v_post.code, 'The reversal could not be posted.');
    END IF;
    IF v_t.kind = 'credit' THEN
        UPDATE timebank.records SET state = 'reversed' WHERE id = v_t.record_id;
        INSERT INTO timebank.record_log (record_id, at, actor_id, state, reason)
        VALUES (v_t.record_id, v_now, v_actor, 'reversed', v_reason);
        PERFORM timebank.s_earn(v_t.to_account, -v_t.minutes, v_now, p_ctx);
    END IF;
    PERFORM timebank.s_emit_movement(v_post.transfer_id, p_ctx);
    RETURN timebank.s_ok('', timebank.s_transfer_result(v_post.transfer_id, v_post.from_balance,
                                                        v_post.to_balance));
END
$$;

-- ------------------------------------------------------------ rules

CREATE FUNCTION timebank.cmd_get_rules(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_comm  bigint := timebank.s_int(p_args, 'community_id');
    v_r     timebank.rules;
BEGIN
    SELECT * INTO v_r FROM timebank.rules WHERE community_id = v_comm;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such community.');
    END IF;
    RETURN timebank.s_ok('', jsonb_build_object('rules', timebank.s_rules_json(v_r)));
END
$$;

CREATE FUNCTION timebank.cmd_set_rules(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now     bigint := timebank.s_now(p_ctx);
    v_actor   bigint := timebank.s_int(p_args, 'actor_id');
    v_reason  text := timebank.s_text(p_args, 'reason');
    v_in      jsonb := coalesce(p_args -> 'rules', '{}');
    v_comm    bigint;
    v_old     timebank.rules;
    v_new     timebank.rules;
    v_stars   integer[];
    -- read as bigint and checked before they go into the narrower columns
    v_od      bigint;
    v_mr      bigint;
    v_md      bigint;
    v_mh      bigint;
    v_lv      bigint;
BEGIN
    IF jsonb_typeof(v_in) <> 'object' THEN
        RETURN timebank.s_err('invalid_argument', 'rules must be an object.');
    END IF;
    v_comm := timebank.s_int(v_in, 'community_id');
    v_od := timebank.s_int(v_in, 'overdraft_minutes');
    v_mr := timebank.s_int(v_in, 'max_record_minutes');
    v_md := timebank.s_int(v_in, 'max_day_minutes');
    v_mh := timebank.s_int(v_in, 'min_held_minutes');
    v_new.gift_policy := timebank.s_text(v_in, 'gift_policy');
    v_lv := timebank.s_int(v_in, 'approval_levels');
    v_new.timezone := timebank.s_text(v_in, 'timezone');
    v_stars := timebank.s_int_array(v_in, 'star_hours');
    IF v_actor IS NULL OR v_actor <= 0 OR v_comm IS NULL OR v_comm <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and rules.community_id are required.');
    END IF;
    IF v_reason IS NULL OR octet_length(v_reason) NOT BETWEEN 1 AND 500 THEN
        RETURN timebank.s_err('invalid_argument', 'A reason of 1 to 500 bytes is required.');
    END IF;
    IF v_od IS NULL OR v_od NOT BETWEEN 0 AND 600000 THEN
        RETURN timebank.s_err('invalid_argument', 'overdraft_minutes is 0 to 600000.');
    END IF;
    IF v_mr IS NULL OR v_mr NOT BETWEEN 1 AND 1440
       OR v_md IS NULL OR v_md NOT BETWEEN 1 AND 1440 THEN
        RETURN timebank.s_err('invalid_argument',
            'max_record_minutes and max_day_minutes are 1 to 1440: a day has 24 hours.');
    END IF;
    IF v_mr > v_md THEN
        RETURN timebank.s_err('invalid_argument',
            'max_record_minutes cannot exceed max_day_minutes.');
    END IF;
    IF v_mh IS NULL OR v_mh NOT BETWEEN 0 AND 6000000 THEN
        RETURN timebank.s_err('invalid_argument', 'min_held_minutes is 0 to 6000000.');
    END IF;
    IF v_new.gift_policy IS NULL
       OR v_new.gift_policy NOT IN ('anyone', 'community', 'family', 'none') THEN
        RETURN timebank.s_err('invalid_argument',
            'gift_policy is one of anyone, community, family, none.');
    END IF;
    IF v_lv IS NULL OR v_lv NOT IN (1, 2) THEN
        RETURN timebank.s_err('invalid_argument', 'approval_levels is 1 or 2.');
    END IF;
    IF v_stars IS NULL OR cardinality(v_stars) > 10
       OR EXISTS (SELECT 1 FROM unnest(v_stars) WITH ORDINALITY AS s (h, i)
                   WHERE h < 1 OR h > 100000 OR h <= coalesce(v_stars[i - 1], 0)) THEN
        RETURN timebank.s_err('invalid_argument',
            'star_hours holds at most 10 levels, ascending, 1 to 100000 hours.');
    END IF;
    IF v_new.timezone IS NULL OR v_new.timezone = ''
       OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = v_new.timezone) THEN
        RETURN timebank.s_err('invalid_argument', 'timezone is an IANA name like Asia/Shanghai.');
    END IF;
    v_new.overdraft_minutes := v_od;
    v_new.max_record_minutes := v_mr;
    v_new.max_day_minutes := v_md;
    v_new.min_held_minutes := v_mh;
    v_new.approval_levels := v_lv;
    SELECT * INTO v_old FROM timebank.rules WHERE community_id = v_comm FOR UPDATE;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such community.');
    END IF;
    IF NOT timebank.s_is_organiser(v_actor, v_comm) THEN
        RETURN timebank.s_err('forbidden', 'Only an organiser of the community may set its rules.');
    END IF;
    IF EXISTS (SELECT 1 FROM timebank.accounts
                WHERE community_id = v_comm AND kind = 'person'
                  AND balance < -v_new.overdraft_minutes) THEN
        RETURN timebank.s_err('limit_in_use',
            'A member is below the new overdraft limit; it cannot be lowered that far yet.');
    END IF;
    UPDATE timebank.rules
       SET overdraft_minutes = v_new.overdraft_minutes,
           max_record_minutes = v_new.max_record_minutes,
           max_day_minutes = v_new.max_day_minutes,
           min_held_minutes = v_new.min_held_minutes,
           gift_policy = v_new.gift_policy,
           approval_levels = v_new.approval_levels,
           star_hours = v_stars,
           timezone = v_new.timezone,
           changed_at = v_now,
           changed_by = v_actor
     WHERE community_id = v_comm
    RETURNING * INTO v_new;
    INSERT INTO timebank.rule_log (community_id, actor_id, at, reason, old_rules, new_rules)
    VALUES (v_comm, v_actor, v_now, v_reason, timebank.s_rules_json(v_old),
            timebank.s_rules_json(v_new));
    PERFORM timebank.s_emit('rules_changed', v_comm, v_now,
        jsonb_build_object('community_id', v_comm, 'actor_id', v_actor, 'reason', v_reason),
        p_ctx);
    RETURN timebank.s_ok('', jsonb_build_object('rules', timebank.s_rules_json(v_new)));
END
$$;

CREATE FUNCTION timebank.cmd_link_family(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now       bigint := timebank.s_now(p_ctx);
    v_actor     bigint := timebank.s_int(p_args, 'actor_id');
    v_person    bigint := timebank.s_int(p_args, 'person_id');
    v_relative  bigint := timebank.s_int(p_args, 'relative_id');
    v_relation  text := timebank.s_text(p_args, 'relation');
    v_p         timebank.people;
BEGIN
    IF v_actor IS NULL OR v_person IS NULL OR v_relative IS NULL OR v_actor <= 0
       OR v_person <= 0 OR v_relative <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id, person_id and relative_id are required.');
    END IF;
    IF v_relation IS NULL OR octet_length(v_relation) NOT BETWEEN 1 AND 32 THEN
        RETURN timebank.s_err('invalid_argument', 'relation holds 1 to 32 bytes.');
    END IF;
    IF v_person = v_relative THEN
        RETURN timebank.s_err('self_transfer', 'A person is not their own relative.');
    END IF;
    SELECT * INTO v_p FROM timebank.people WHERE id = v_person;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM timebank.people WHERE id = v_relative) THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    IF v_actor <> v_person AND NOT timebank.s_is_organiser(v_actor, v_p.community_id) THEN
        RETURN timebank.s_err('forbidden',
            'Only the person or an organiser of their community may link family.');
    END IF;
    INSERT INTO timebank.family (person_id, relative_id, relation, created_by, created_at)
    VALUES (v_person, v_relative, v_relation, v_actor, v_now),
           (v_relative, v_person, v_relation, v_actor, v_now)
    ON CONFLICT DO NOTHING;
    RETURN timebank.s_ok('', jsonb_build_object('id', v_relative));
END
$$;

-- ------------------------------------------------------------ queries

-- The account a query names: account_id, or person_id's account.
CREATE FUNCTION timebank.s_query_account(p_args jsonb) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN timebank.s_int(p_args, 'account_id') > 0 THEN
            (SELECT id FROM timebank.accounts WHERE id = timebank.s_int(p_args, 'account_id'))
        WHEN timebank.s_int(p_args, 'person_id') > 0 THEN
            timebank.s_person_account(timebank.s_int(p_args, 'person_id'))
    END
$$;

CREATE FUNCTION timebank.cmd_get_balance(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_id   bigint := timebank.s_query_account(p_args);
    a      timebank.accounts;
    r      timebank.rules;
    v_next bigint;
BEGIN
    SELECT * INTO a FROM timebank.accounts WHERE id = v_id;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such account.');
    END IF;
    SELECT * INTO r FROM timebank.rules WHERE community_id = a.community_id;
    SELECT min(h)::bigint * 60 - a.earned INTO v_next
      FROM unnest(r.star_hours) h WHERE h::bigint * 60 > a.earned;
    RETURN timebank.s_ok('', jsonb_build_object(
        'account_id', a.id, 'person_id', coalesce(a.person_id, 0),
        'community_id', a.community_id, 'kind', a.kind, 'balance', a.balance,
        'limit', CASE WHEN a.kind = 'person' THEN -r.overdraft_minutes ELSE 0 END,
        'earned_minutes', a.earned, 'stars', timebank.s_stars(a.earned, r.star_hours),
        'next_star_minutes', coalesce(v_next, 0)));
END
$$;

CREATE FUNCTION timebank.cmd_get_statement(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_id     bigint := timebank.s_query_account(p_args);
    v_from   bigint := timebank.s_int(p_args, 'from');
    v_to     bigint := timebank.s_int(p_args, 'to');
    v_after  bigint := timebank.s_int(p_args, 'after_entry_id');
    v_limit  bigint := timebank.s_int(p_args, 'limit');
    v_open   bigint;
    v_lines  jsonb;
    v_n      integer;
    v_close  bigint;
    v_lo     bigint;
    v_hi     bigint;
    a        timebank.accounts;
BEGIN
    IF v_from IS NULL OR v_to IS NULL OR v_after IS NULL OR v_limit IS NULL THEN
        RETURN timebank.s_err('invalid_argument', 'An argument has the wrong type.');
    END IF;
    IF v_to = 0 THEN
        v_to := timebank.s_now(p_ctx) + 1;
    END IF;
    IF v_from < 0 OR v_to <= v_from THEN
        RETURN timebank.s_err('invalid_period', 'The period must have from < to.');
    END IF;
    IF v_limit = 0 THEN
        v_limit := 500;
    ELSIF v_limit NOT BETWEEN 1 AND 1000 THEN
        RETURN timebank.s_err('invalid_argument', 'limit is 1 to 1000.');
    END IF;
    SELECT * INTO a FROM timebank.accounts WHERE id = v_id;
    IF NOT FOUND THEN
        RETURN timebank.s_err('not_found', 'No such account.');
    END IF;
    -- The lines are the account's entries in ledger order (by id), from the
    -- one after the last entry dated before `from` to the last one dated
    -- before `to`: a contiguous run, so that the opening balance plus the
    -- lines is the closing balance even where two transactions committed
    -- out of their dates' order (an entry dated just outside the period
    -- then shows in it).
    SELECT id INTO v_hi FROM timebank.entries
     WHERE account_id = v_id AND at < v_to ORDER BY id DESC LIMIT 1;
    SELECT id, balance INTO v_lo, v_open FROM timebank.entries
     WHERE account_id = v_id AND id <= coalesce(v_hi, 0) AND at < v_from
     ORDER BY id DESC LIMIT 1;
    IF v_after > 0 THEN
        SELECT balance INTO v_open FROM timebank.entries WHERE id = v_after AND account_id = v_id;
        IF NOT FOUND THEN
            RETURN timebank.s_err('not_found', 'after_entry_id is not a line of this account.');
        END IF;
        v_lo := greatest(coalesce(v_lo, 0), v_after);
    END IF;
    v_open := coalesce(v_open, 0);
    v_lo := coalesce(v_lo, 0);
    v_hi := coalesce(v_hi, 0);
    WITH l AS (
        SELECT e.id, e.transfer_id, e.at, t.kind, e.amount, e.balance,
               CASE WHEN t.from_account = v_id THEN t.to_account
                    WHEN t.to_account = v_id THEN t.from_account
                    WHEN e.amount > 0 THEN t.from_account ELSE t.to_account END AS other,
               t.memo
          FROM timebank.entries e
          JOIN timebank.transfers t ON t.id = e.transfer_id
         WHERE e.account_id = v_id AND e.id > v_lo AND e.id <= v_hi
         ORDER BY e.id
         LIMIT v_limit + 1
    )
    SELECT jsonb_agg(jsonb_build_object('entry_id', l.id, 'transfer_id', l.transfer_id,
                         'at', l.at, 'kind', l.kind, 'amount', l.amount, 'balance', l.balance,
                         'counterparty_account_id', l.other,
                         'counterparty_person_id', coalesce(o.person_id, 0), 'memo', l.memo)
                     ORDER BY l.id),
           count(*)
      INTO v_lines, v_n
      FROM l LEFT JOIN timebank.accounts o ON o.id = l.other;
    v_lines := coalesce(v_lines, '[]');
    IF v_n > v_limit THEN
        v_lines := v_lines - (v_n - 1);
    END IF;
    v_close := coalesce((v_lines -> -1 ->> 'balance')::bigint, v_open);
    RETURN timebank.s_ok('', jsonb_build_object(
        'account_id', v_id, 'person_id', coalesce(a.person_id, 0), 'from', v_from, 'to', v_to,
        'opening_balance', v_open, 'closing_balance', v_close, 'lines', v_lines,
        'more', v_n > v_limit));
END
$$;

CREATE FUNCTION timebank.cmd_get_totals(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_comm  bigint := timebank.s_int(p_args, 'community_id');
    v_res   jsonb;
BEGIN
    IF v_comm IS NULL OR v_comm < 0 THEN
        RETURN timebank.s_err('invalid_argument', 'community_id is an id, or 0 for the city.');
    END IF;
    IF v_comm > 0 AND NOT EXISTS (SELECT 1 FROM timebank.communities WHERE id = v_comm) THEN
        RETURN timebank.s_err('not_found', 'No such community.');
    END IF;
    -- movements count for the community that paid them (the pool for
    -- credits, the payer otherwise); a reversal takes its movement back
    WITH m AS (
        SELECT coalesce(o.kind, t.kind) AS kind,
               CASE WHEN t.kind = 'reversal' THEN -t.minutes ELSE t.minutes END AS minutes,
               CASE WHEN t.kind = 'reversal' THEN ta.community_id ELSE fa.community_id END
                   AS community_id
          FROM timebank.transfers t
          LEFT JOIN timebank.transfers o ON o.id = t.reverses_id
          JOIN timebank.accounts fa ON fa.id = t.from_account
          JOIN timebank.accounts ta ON ta.id = t.to_account
    )
    SELECT jsonb_build_object(
        'community_id', v_comm,
        'credited_minutes', coalesce(sum(minutes) FILTER (WHERE kind = 'credit'), 0),
        'gifted_minutes', coalesce(sum(minutes) FILTER (WHERE kind = 'gift'), 0),
        'spent_minutes', coalesce(sum(minutes) FILTER (WHERE kind = 'spend'), 0))
      INTO v_res
      FROM m WHERE v_comm = 0 OR m.community_id = v_comm;
    SELECT v_res || jsonb_build_object(
               'held_minutes', coalesce(sum(balance), 0),
               'accounts', count(*),
               'volunteers_credited', count(*) FILTER (WHERE earned > 0))
      INTO v_res
      FROM timebank.accounts WHERE kind = 'person' AND (v_comm = 0 OR community_id = v_comm);
    SELECT v_res || jsonb_build_object('records_pending', count(*))
      INTO v_res
      FROM timebank.records
     WHERE state IN ('pending', 'approved') AND (v_comm = 0 OR community_id = v_comm);
    RETURN timebank.s_ok('', v_res);
END
$$;

CREATE FUNCTION timebank.cmd_get_history(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_person  bigint := timebank.s_int(p_args, 'person_id');
    v_from    bigint := timebank.s_int(p_args, 'from');
    v_to      bigint := timebank.s_int(p_args, 'to');
    v_items   jsonb;
    v_total   bigint;
BEGIN
    IF v_person IS NULL OR v_from IS NULL OR v_to IS NULL OR v_person <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'person_id is required.');
    END IF;
    IF v_to = 0 THEN
        v_to := timebank.s_now(p_ctx) + 1;
    END IF;
    IF v_from < 0 OR v_to <= v_from THEN
        RETURN timebank.s_err('invalid_period', 'The period must have from < to.');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timebank.people WHERE id = v_person) THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    WITH g AS (
        SELECT r.activity_id, coalesce(a.title, '') AS title, r.field,
               sum(r.minutes) AS minutes, count(*) AS records,
               min(r.started_at) AS first_at, max(r.started_at) AS last_at
          FROM timebank.records r
          LEFT JOIN timebank.activities a ON a.id = r.activity_id
         WHERE r.person_id = v_person AND r.state = 'credited'
           AND r.started_at >= v_from AND r.started_at < v_to
         GROUP BY r.activity_id, a.title, r.field
    )
    SELECT jsonb_agg(jsonb_build_object('activity_id', activity_id, 'title', title,
                         'field', field, 'minutes', minutes, 'records', records,
                         'first_at', first_at, 'last_at', last_at) ORDER BY first_at, activity_id),
           sum(minutes)
      INTO v_items, v_total
      FROM g;
    RETURN timebank.s_ok('', jsonb_build_object('person_id', v_person,
        'total_minutes', coalesce(v_total, 0), 'items', coalesce(v_items, '[]')));
END
$$;

CREATE FUNCTION timebank.cmd_list_records(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_comm    bigint := timebank.s_int(p_args, 'community_id');
    v_person  bigint := timebank.s_int(p_args, 'person_id');
    v_state   text := timebank.s_text(p_args, 'state');
    v_after   bigint := timebank.s_int(p_args, 'after_id');
    v_limit   bigint := timebank.s_int(p_args, 'limit');
    v_list    jsonb;
    v_n       integer;
BEGIN
    IF v_comm IS NULL OR v_person IS NULL OR v_state IS NULL OR v_after IS NULL
       OR v_limit IS NULL THEN
        RETURN timebank.s_err('invalid_argument', 'An argument has the wrong type.');
    END IF;
    IF v_comm <= 0 AND v_person <= 0 THEN
        RETURN timebank.s_err('invalid_argument', 'Name a community_id or a person_id.');
    END IF;
    IF v_state NOT IN ('', 'pending', 'approved', 'credited', 'declined', 'reversed') THEN
        RETURN timebank.s_err('invalid_argument',
            'state is pending, approved, credited, declined or reversed.');
    END IF;
    IF v_limit = 0 THEN
        v_limit := 100;
    ELSIF v_limit NOT BETWEEN 1 AND 1000 THEN
        RETURN timebank.s_err('invalid_argument', 'limit is 1 to 1000.');
    END IF;
    WITH l AS (
        SELECT * FROM timebank.records r
         WHERE (v_comm <= 0 OR r.community_id = v_comm)
           AND (v_person <= 0 OR r.person_id = v_person)
           AND (v_state = '' OR r.state = v_state)
           AND r.id > v_after
         ORDER BY r.id
         LIMIT v_limit + 1
    )
    SELECT jsonb_agg(jsonb_build_object('id', id, 'person_id', person_id,
                         'community_id', community_id, 'activity_id', activity_id,
                         'minutes', minutes, 'started_at', started_at, 'field', field,
                         'content', content, 'state', state, 'source', source,
                         'needs_review', needs_review, 'approvals', approvals,
                         'reason', reason) ORDER BY id),
           count(*)
      INTO v_list, v_n
      FROM l;
    v_list := coalesce(v_list, '[]');
    IF v_n > v_limit THEN
        v_list := v_list - (v_n - 1);
    END IF;
    RETURN timebank.s_ok('', jsonb_build_object('records', v_list, 'more', v_n > v_limit));
END
$$;

-- ------------------------------------------------------------ certificates

-- The text a certificate's digest is taken over: its fields and, from the
-- ledger, each movement it covers. The daemon signs the digest with a key
-- the database never sees (the verification code), so neither a forged
-- number nor an altered row or movement yields a code that checks.
CREATE FUNCTION timebank.s_cert_text(c timebank.certificates) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT concat_ws(E'\n', 'linli-certificate-v1', c.number, c.person_id, c.holder_name,
               c.id_number_masked, c.community_id, c.issuer, c.issued_by, c.issued_at,
               c.period_from, c.period_to, c.total_minutes, c.periods::text,
               (SELECT string_agg(coalesce(t.id || ':' || t.minutes || ':' || t.at || ':'
                                           || t.to_account, 'missing:' || m), ','
                                  ORDER BY m)
                  FROM unnest(c.movements) m
                  LEFT JOIN timebank.transfers t ON t.id = m AND t.kind = 'credit'))
$$;

CREATE FUNCTION timebank.s_cert_json(c timebank.certificates, p_digest text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('number', c.number, 'person_id', c.person_id,
               'holder_name', c.holder_name, 'id_number_masked', c.id_number_masked,
               'community_id', c.community_id, 'issuer', c.issuer, 'issued_at', c.issued_at,
               'from', c.period_from, 'to', c.period_to, 'total_minutes', c.total_minutes,
               'periods', c.periods, 'movements', cardinality(c.movements),
               'digest', p_digest)
$$;

CREATE FUNCTION timebank.cmd_issue_certificate(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now     bigint := timebank.s_now(p_ctx);
    v_actor   bigint := timebank.s_int(p_args, 'actor_id');
    v_person  bigint := timebank.s_int(p_args, 'person_id');
    v_comm    bigint := timebank.s_int(p_args, 'community_id');
    v_from    bigint := timebank.s_int(p_args, 'from');
    v_to      bigint := timebank.s_int(p_args, 'to');
    v_name    text := timebank.s_text(p_args, 'holder_name');
    v_idno    text := upper(timebank.s_text(p_args, 'id_number'));
    v_acct    bigint;
    v_tz      text;
    v_c       timebank.certificates;
    v_digest  text;
BEGIN
    IF v_actor IS NULL OR v_person IS NULL OR v_comm IS NULL OR v_from IS NULL OR v_to IS NULL
       OR v_name IS NULL OR v_idno IS NULL OR v_actor <= 0 OR v_person <= 0 OR v_comm < 0 THEN
        RETURN timebank.s_err('invalid_argument', 'actor_id and person_id are required.');
    END IF;
    IF v_to = 0 THEN
        v_to := v_now + 1;
    END IF;
    IF v_from < 0 OR v_to <= v_from THEN
        RETURN timebank.s_err('invalid_period', 'The period must have from < to.');
    END IF;
    IF octet_length(v_name) NOT BETWEEN 1 AND 64 OR v_name ~ '[[:cntrl:]]' THEN
        RETURN timebank.s_err('invalid_argument',
            'holder_name holds 1 to 64 bytes and no control characters.');
    END IF;
    IF v_idno !~ '^[0-9A-Z]{6,32}$' THEN
        RETURN timebank.s_err('invalid_argument',
            'id_number is 6 to 32 letters and digits, as on the identity document.');
    END IF;
    IF v_comm = 0 THEN
        SELECT community_id INTO v_comm FROM timebank.people WHERE id = v_actor;
    END IF;
    IF NOT timebank.s_is_organiser(v_actor, v_comm) THEN
        RETURN timebank.s_err('forbidden',
            'Only an organiser of the issuing community may issue certificates.');
    END IF;
    v_acct := timebank.s_person_account(v_person);
    IF v_acct IS NULL THEN
        RETURN timebank.s_err('not_found', 'No such person.');
    END IF;
    SELECT timezone INTO v_tz FROM timebank.rules WHERE community_id = v_comm;
    v_c.person_id := v_person;
    v_c.community_id := v_comm;
    v_c.issuer := (SELECT name FROM timebank.communities WHERE id = v_comm);
    v_c.holder_name := v_name;
    v_c.id_number_masked := repeat('*', length(v_idno) - 4) || right(v_idno, 4);
    v_c.issued_by := v_actor;
    v_c.issued_at := v_now;
    v_c.period_from := v_from;
    v_c.period_to := v_to;
    -- the credits of the period that stand (not reversed), with what the
    -- service was, month by month in the issuer's time zone
    WITH cr AS (
        SELECT t.id, t.minutes, t.at, r.field, coalesce(a.title, '') AS title,
               to_char(to_timestamp(r.started_at / 1000.0) AT TIME ZONE v_tz, 'YYYY-MM') AS month
          FROM timebank.transfers t
          JOIN timebank.records r ON r.id = t.record_id
          LEFT JOIN timebank.activities a ON a.id = r.activity_id
         WHERE t.kind = 'credit' AND t.to_account = v_acct
           AND r.started_at >= v_from AND r.started_at < v_to
           AND NOT EXISTS (SELECT 1 FROM timebank.transfers x WHERE x.reverses_id = t.id)
    ), months AS (
        SELECT month, sum(minutes) AS minutes,
               string_agg(DISTINCT nullif(concat_ws(' / ', nullif(field, ''), nullif(title, '')),
                                          ''), '; ') AS content
          FROM cr GROUP BY month
    )
    SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM cr),
           (SELECT coalesce(sum(minutes), 0) FROM cr),
           (SELECT coalesce(jsonb_agg(jsonb_build_object('month', month, 'minutes', minutes,
                                                         'content', coalesce(content, ''))
                                      ORDER BY month), '[]') FROM months)
      INTO v_c.movements, v_c.total_minutes, v_c.periods;
    IF v_c.total_minutes = 0 THEN
        RETURN timebank.s_err('nothing_to_certify', 'No verified hours in this period.');
    END IF;
    v_c.number := 'LX-' || to_char(to_timestamp(v_now / 1000.0) AT TIME ZONE v_tz, 'YYYY')
                  || '-' || lpad(nextval('timebank.certificate_seq')::text, 6, '0');
    v_digest := encode(sha256(convert_to(timebank.s_cert_text(v_c), 'UTF8')), 'hex');
    v_c.digest := v_digest;
    INSERT INTO timebank.certificates SELECT v_c.*;
    PERFORM timebank.s_emit('certificate_issued', v_comm, v_now,
        jsonb_build_object('number', v_c.number, 'person_id', v_person, 'community_id', v_comm,
                           'total_minutes', v_c.total_minutes),
        p_ctx);
    RETURN timebank.s_ok('', timebank.s_cert_json(v_c, v_digest));
END
$$;

-- Looks a code's certificate up and recomputes its digest from the stored
-- fields and the ledger; the daemon then checks the code against it.
CREATE FUNCTION timebank.cmd_verify_certificate(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_code    text := upper(btrim(timebank.s_text(p_args, 'code')));
    v_number  text;
    v_c       timebank.certificates;
    v_digest  text;
    v_rev     bigint;
BEGIN
    IF v_code IS NULL OR octet_length(v_code) > 100 THEN
        RETURN timebank.s_err('invalid_argument', 'code is the text printed on the certificate.');
    END IF;
    v_number := substring(v_code FROM '^(LX-[0-9]{4}-[0-9]{6,})-[A-Z2-7]{16}$');
    IF v_number IS NULL THEN
        RETURN timebank.s_ok('', jsonb_build_object('code', v_code, 'valid', false,
            'problem', 'this is not a certificate code'));
    END IF;
    SELECT * INTO v_c FROM timebank.certificates WHERE number = v_number;
    IF NOT FOUND THEN
        RETURN timebank.s_ok('', jsonb_build_object('code', v_code, 'number', v_number,
            'valid', false, 'problem', 'no certificate has this number'));
    END IF;
    v_digest := encode(sha256(convert_to(timebank.s_cert_text(v_c), 'UTF8')), 'hex');
    SELECT coalesce(sum(t.minutes), 0) INTO v_rev
      FROM timebank.transfers t
     WHERE t.reverses_id = ANY (v_c.movements);
    -- authentic, but no longer standing in full: the reader must know
    RETURN timebank.s_ok('', timebank.s_cert_json(v_c, v_digest)
                             || jsonb_build_object('code', v_code, 'reversed_minutes', v_rev)
                             || CASE WHEN v_rev > 0 THEN jsonb_build_object('problem',
                                    format('%s of the %s minutes it certifies were reversed after '
                                           'it was issued', v_rev, v_c.total_minutes))
                                ELSE '{}' END);
END
$$;

-- ------------------------------------------------------------ registry events

-- Applies one registry event of a kind the timebank follows; others are
-- ignored. The caller keeps the stream position.
CREATE FUNCTION timebank.s_apply_one(v_type text, p jsonb, v_at bigint, p_ctx jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_stay    timebank.open_stays;
    v_act     timebank.activities;
    v_r       timebank.rules;
    v_min     bigint;
    v_cap     bigint;
    v_why     text := '';
    v_day     date;
    v_rec     bigint;
    v_auto    boolean;
BEGIN
    IF v_type = 'community_created' THEN
        PERFORM timebank.s_community_ensure(timebank.s_int(p, 'id'),
                    coalesce(timebank.s_text(p, 'name'), ''),
                    coalesce(timebank.s_text(p, 'district'), ''), v_at);
    ELSIF v_type = 'person_registered' THEN
        PERFORM timebank.s_community_ensure(timebank.s_int(p, 'community_id'), '', '', v_at);
        INSERT INTO timebank.people (id, community_id, volunteer, organiser, created_at)
        VALUES (timebank.s_int(p, 'id'), timebank.s_int(p, 'community_id'),
                coalesce(p -> 'roles', '[]') ?| ARRAY['ROLE_VOLUNTEER', 'ROLE_ORGANISER']
                    OR coalesce(p -> 'roles', '[]') @> '[2]'
                    OR coalesce(p -> 'roles', '[]') @> '[3]',
                coalesce(p -> 'roles', '[]') ? 'ROLE_ORGANISER'
                    OR coalesce(p -> 'roles', '[]') @> '[3]',
                v_at)
        ON CONFLICT (id) DO NOTHING;   -- one id, one person: the stream never reuses ids
        INSERT INTO timebank.accounts (kind, person_id, community_id, created_at)
        VALUES ('person', timebank.s_int(p, 'id'), timebank.s_int(p, 'community_id'), v_at)
        ON CONFLICT (person_id) WHERE kind = 'person' DO NOTHING;
    ELSIF v_type = 'activity_created' THEN
        PERFORM timebank.s_community_ensure(timebank.s_int(p, 'community_id'), '', '', v_at);
        INSERT INTO timebank.activities (id, community_id, title, starts_at, ends_at)
        VALUES (timebank.s_int(p, 'id'), timebank.s_int(p, 'community_id'),
                coalesce(timebank.s_text(p, 'title'), ''), timebank.s_int(p, 'starts_at'),
                timebank.s_int(p, 'ends_at'))
        ON CONFLICT (id) DO UPDATE SET title = excluded.title, starts_at = excluded.starts_at,
            ends_at = excluded.ends_at;
    ELSIF v_type = 'checked_out' THEN
        DELETE FROM timebank.open_stays WHERE checkin_id = timebank.s_int(p, 'checkin_id')
        RETURNING * INTO v_stay;
        IF v_stay.checkin_id IS NOT NULL THEN
            SELECT * INTO v_act FROM timebank.activities WHERE id = v_stay.activity_id;
            SELECT * INTO v_r FROM timebank.rules WHERE community_id = v_act.community_id;
            v_auto := coalesce((p ->> 'automatic')::boolean, false);
            v_min := (timebank.s_int(p, 'at') - v_stay.at) / 60000;
            v_cap := least((v_act.ends_at - v_act.starts_at) / 60000, v_r.max_record_minutes);
            IF v_min > v_cap THEN
                v_min := v_cap;
                v_why := 'capped at the activity''s scheduled length';
            END IF;
            IF v_auto THEN
                v_why := concat_ws('; ', nullif(v_why, ''), 'automatic check-out');
            END IF;
            v_day := timebank.s_day(v_stay.at, v_r.timezone);
            IF v_min >= 1 AND timebank.s_day_minutes(v_stay.person_id, v_day, 0) + v_min
                              > v_r.max_day_minutes THEN
                v_why := concat_ws('; ', nullif(v_why, ''), 'over the daily maximum');
            END IF;
            IF v_min >= 1 THEN
                INSERT INTO timebank.records (person_id, community_id, activity_id, minutes,
                                              started_at, day, field, content, source,
                                              checkin_id, needs_review, reason, levels,
                                              created_by, created_at)
                VALUES (v_stay.person_id, v_act.community_id, v_act.id, v_min, v_stay.at, v_day,
                        '', v_act.title, 'checkin', v_stay.checkin_id, v_auto OR v_why <> '',
                        v_why, v_r.approval_levels, 0, v_at)
                ON CONFLICT (checkin_id) WHERE checkin_id IS NOT NULL DO NOTHING
                RETURNING id INTO v_rec;
                IF v_rec IS NOT NULL THEN
                    INSERT INTO timebank.record_log (record_id, at, actor_id, state, reason)
                    VALUES (v_rec, v_at, 0, 'pending', v_why);
                    PERFORM timebank.s_emit('hours_recorded', v_act.community_id, v_at,
                        jsonb_build_object('record_id', v_rec, 'person_id', v_stay.person_id,
                            'community_id', v_act.community_id, 'activity_id', v_act.id,
                            'minutes', v_min, 'source', 'checkin',
                            'needs_review', v_auto OR v_why <> ''),
                        p_ctx);
                END IF;
            END IF;
        END IF;
    END IF;
END
$$;

-- Applies a run of registry events (an internal command of the daemon's
-- subscriber), each at most once: the stream position is stored with the
-- change. args: {"stream", "epoch", "first", "last", "events": [{"seq",
-- "type", "at", "p": payload}, ...]}, the events numbered first..last of
-- which the daemon sends only the kinds the timebank follows (the others
-- only move the position). Events at or below the stored position are
-- skipped; 'gap' when the run starts past the next expected event, and
-- the daemon then resubscribes from the stored position.
CREATE FUNCTION timebank.cmd_apply_events(p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_stream  text := timebank.s_text(p_args, 'stream');
    v_epoch   bigint := timebank.s_int(p_args, 'epoch');
    v_first   bigint := timebank.s_int(p_args, 'first');
    v_last    bigint := timebank.s_int(p_args, 'last');
    v_events  jsonb := coalesce(p_args -> 'events', '[]');
    v_pos     timebank.inbox;
    v_done    bigint;
    e         record;
BEGIN
    IF v_stream IS NULL OR v_stream = '' OR v_epoch IS NULL OR v_first IS NULL
       OR v_last IS NULL OR v_first < 1 OR v_last < v_first
       OR jsonb_typeof(v_events) <> 'array' THEN
        RETURN timebank.s_err('invalid_argument',
            'stream, epoch, first <= last and an array of events are required.');
    END IF;
    -- Every event is an object with an integer seq from first to last, and
    -- a check-in's ids are integers. Read by jsonb_to_recordset, which is
    -- fast and raises on a wrong type: here, before anything is written.
    BEGIN
        IF EXISTS (SELECT 1 FROM jsonb_to_recordset(v_events) AS x (seq bigint)
                    WHERE x.seq IS NULL OR x.seq NOT BETWEEN v_first AND v_last)
           OR EXISTS (SELECT 1
                        FROM jsonb_to_recordset(v_events) AS x (type text, p jsonb),
                             jsonb_to_record(coalesce(x.p, '{}')) AS y (checkin_id bigint,
                                 person_id bigint, activity_id bigint, at bigint)
                       WHERE x.type = 'checked_in' AND y.checkin_id IS NULL) THEN
            RETURN timebank.s_err('invalid_argument',
                'Every event has a seq from first to last; a check-in has its ids.');
        END IF;
    EXCEPTION WHEN data_exception THEN
        RETURN timebank.s_err('invalid_argument', 'An event is not what the registry sends.');
    END;
    SELECT * INTO v_pos FROM timebank.inbox WHERE stream = v_stream FOR UPDATE;
    IF NOT FOUND THEN
        IF v_first <> 1 THEN
            RETURN timebank.s_err('gap', format('expected %s event 1, got %s', v_stream, v_first));
        END IF;
        INSERT INTO timebank.inbox (stream, epoch, seq) VALUES (v_stream, v_epoch, 0);
        v_done := 0;
    ELSIF v_pos.epoch <> v_epoch THEN
        -- The registry's history restarted (a new epoch): its ids start
        -- again, and the people, activities and check-ins they name are no
        -- longer the ones our accounts and records belong to. Hours are
        -- money: nothing is applied, and an operator decides.
        RETURN timebank.s_err('epoch_changed',
            format('The registry''s history restarted (epoch %s, ours %s): its ids no longer '
                   'name what the ledger holds.', v_epoch, v_pos.epoch));
    ELSIF v_last <= v_pos.seq THEN
        RETURN timebank.s_ok('duplicate', '{}');
    ELSIF v_first > v_pos.seq + 1 THEN
        RETURN timebank.s_err('gap', format('expected %s event %s, got %s', v_stream,
                                            v_pos.seq + 1, v_first));
    ELSE
        v_done := v_pos.seq;
    END IF;
    -- Check-ins are the flood: they go in one statement, after the events
    -- that create what they name and before the check-outs that close
    -- them. That is the order of the stream: the registry registers a
    -- person and creates an activity before anyone checks in there, and
    -- checks a check-in out after it.
    FOR e IN SELECT x.type, x.at, x.p
               FROM jsonb_to_recordset(v_events) AS x (seq bigint, type text, at bigint, p jsonb)
              WHERE x.type NOT IN ('checked_in', 'checked_out') AND x.seq > v_done LOOP
        PERFORM timebank.s_apply_one(coalesce(e.type, ''), coalesce(e.p, '{}'),
                                     coalesce(e.at, 0), p_ctx);
    END LOOP;
    -- a volunteer's stay at an activity is service; others attend
    INSERT INTO timebank.open_stays (checkin_id, person_id, activity_id, at)
    SELECT y.checkin_id, y.person_id, y.activity_id, coalesce(y.at, 0)
      FROM jsonb_to_recordset(v_events) AS x (seq bigint, type text, p jsonb),
           jsonb_to_record(x.p) AS y (checkin_id bigint, person_id bigint, activity_id bigint,
                                      at bigint)
     WHERE x.type = 'checked_in' AND x.seq > v_done AND y.activity_id > 0
       AND (SELECT p.volunteer FROM timebank.people p WHERE p.id = y.person_id)
       AND (SELECT true FROM timebank.activities a WHERE a.id = y.activity_id)
    ON CONFLICT DO NOTHING;
    FOR e IN SELECT x.type, x.at, x.p
               FROM jsonb_to_recordset(v_events) AS x (seq bigint, type text, at bigint, p jsonb)
              WHERE x.type = 'checked_out' AND x.seq > v_done LOOP
        PERFORM timebank.s_apply_one('checked_out', coalesce(e.p, '{}'), coalesce(e.at, 0),
                                     p_ctx);
    END LOOP;
    UPDATE timebank.inbox SET epoch = v_epoch, seq = v_last WHERE stream = v_stream;
    RETURN timebank.s_ok('applied', '{}');
END
$$;

CREATE FUNCTION timebank.inbox_position(p_stream text)
RETURNS TABLE (epoch bigint, seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(i.epoch), 0), coalesce(max(i.seq), 0)
      FROM timebank.inbox i WHERE i.stream = p_stream
$$;

-- ------------------------------------------------------------ entry points

CREATE FUNCTION timebank.exec(p_name text, p_key text, p_args jsonb, p_ctx jsonb)
RETURNS timebank.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_key   text := coalesce(p_key, '');
    v_args  jsonb := coalesce(p_args, '{}');
    v_ctx   jsonb := coalesce(p_ctx, '{}');
    v_log   record;
    v_read  boolean := p_name IN ('get_rules', 'get_balance', 'get_statement', 'get_totals',
                                  'get_history', 'list_records', 'verify_certificate');
    r       timebank.cmd_result;
BEGIN
    IF v_key <> '' AND NOT v_read THEN
        IF octet_length(v_key) > 256 THEN
            RETURN timebank.s_err('invalid_argument',
                'The idempotency key is longer than 256 bytes.');
        END IF;
        SELECT command, code, message, result INTO v_log
          FROM timebank.command_log WHERE key = v_key;
        IF FOUND THEN
            IF v_log.command IS DISTINCT FROM p_name THEN
                RETURN timebank.s_err('idempotency_conflict',
                    'This idempotency key was already used for another command.');
            END IF;
            RETURN ROW(v_log.code, v_log.message, v_log.result::jsonb)::timebank.cmd_result;
        END IF;
        v_ctx := v_ctx || jsonb_build_object('key', v_key);
    ELSE
        v_ctx := v_ctx - 'key';
    END IF;
    IF jsonb_typeof(v_args) <> 'object' THEN
        r := timebank.s_err('invalid_argument', 'The arguments must be a JSON object.');
    ELSE
        r := CASE p_name
            WHEN 'gift' THEN timebank.cmd_gift(v_args, v_ctx)
            WHEN 'spend' THEN timebank.cmd_spend(v_args, v_ctx)
            WHEN 'apply_events' THEN timebank.cmd_apply_events(v_args, v_ctx)
            WHEN 'record_hours' THEN timebank.cmd_record_hours(v_args, v_ctx)
            WHEN 'approve_hours' THEN timebank.cmd_approve_hours(v_args, v_ctx)
            WHEN 'decline_hours' THEN timebank.cmd_decline_hours(v_args, v_ctx)
            WHEN 'reverse' THEN timebank.cmd_reverse(v_args, v_ctx)
            WHEN 'get_balance' THEN timebank.cmd_get_balance(v_args, v_ctx)
            WHEN 'get_statement' THEN timebank.cmd_get_statement(v_args, v_ctx)
            WHEN 'get_totals' THEN timebank.cmd_get_totals(v_args, v_ctx)
            WHEN 'get_history' THEN timebank.cmd_get_history(v_args, v_ctx)
            WHEN 'list_records' THEN timebank.cmd_list_records(v_args, v_ctx)
            WHEN 'get_rules' THEN timebank.cmd_get_rules(v_args, v_ctx)
            WHEN 'set_rules' THEN timebank.cmd_set_rules(v_args, v_ctx)
            WHEN 'link_family' THEN timebank.cmd_link_family(v_args, v_ctx)
            WHEN 'issue_certificate' THEN timebank.cmd_issue_certificate(v_args, v_ctx)
            WHEN 'verify_certificate' THEN timebank.cmd_verify_certificate(v_args, v_ctx)
            ELSE timebank.s_err('unknown_command', 'Unknown command.')
        END;
    END IF;
    IF v_key <> '' AND NOT v_read AND r.code <> 'unknown_command' THEN
        INSERT INTO timebank.command_log (key, command, code, message, result)
        VALUES (v_key, p_name, r.code, r.message, r.result::json);
    END IF;
    RETURN r;
END
$$;

-- ------------------------------------------------------------ relay

CREATE FUNCTION timebank.outbox_state(p_stream text)
RETURNS TABLE (epoch bigint, last_seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.epoch, coalesce((SELECT max(o.seq) FROM timebank.outbox o
                               WHERE o.stream = s.stream), 0)
      FROM timebank.outbox_stream s
     WHERE s.stream = p_stream
$$;

CREATE FUNCTION timebank.outbox_replay(p_stream text, p_after bigint, p_limit integer)
RETURNS TABLE (seq bigint, epoch bigint, event_id uuid, type text, community_id bigint,
               trace_id text, occurred_at bigint, payload text)
LANGUAGE sql STABLE AS $$
    SELECT o.seq, s.epoch, md5(s.stream || ':' || s.epoch || ':' || o.seq)::uuid,
           o.type, o.community_id, o.trace_id, o.occurred_at, o.payload::text
      FROM timebank.outbox_stream s
      JOIN timebank.outbox o ON o.stream = s.stream
     WHERE s.stream = p_stream AND o.seq > p_after
     ORDER BY o.seq
     LIMIT greatest(p_limit, 0)
$$;
