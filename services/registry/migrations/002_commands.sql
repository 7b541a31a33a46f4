-- Registry command functions. The daemon calls, many times per pipelined
-- transaction,
--     SELECT code, message, result::text
--       FROM registry.exec($1 name, $2 idempotency key, $3::jsonb args, $4::jsonb ctx)
-- and turns (code, message, result) into a Reply. Rules every function here
-- keeps:
--   * bad input never raises: it returns a stable error code (an exception
--     would abort the whole batch, which the daemon then replays one by one);
--   * an error reply changes nothing: every check runs before the first write;
--   * business time is ctx.now (ms), never now(), so tests control the clock;
--   * every change writes its events to registry.outbox in the same
--     transaction, through registry.s_emit; payloads never carry a person's
--     name or phone;
--   * args are read through the s_int / s_text / s_bool ... helpers below,
--     which map an absent key to the proto default and a wrong JSON type to
--     NULL (-> invalid_argument). They are one-expression SQL functions, so
--     the planner inlines them into the PL/pgSQL expressions that use them.
--
-- Locking: everything that moves seats (sign_up, cancel_sign_up,
-- respond_offer, sweep) first locks the activity row FOR NO KEY UPDATE, so
-- seat counting is serial per activity and never blocks check-ins.

-- ------------------------------------------------------------ arg helpers

-- A JSON integer that fits bigint, else NULL. The nested CASE (not AND) keeps
-- the casts from being constant-folded, and so from raising, on bad input.
CREATE FUNCTION registry.s_jint(v jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(v) IS DISTINCT FROM 'number' THEN NULL
        WHEN v::numeric % 1 <> 0 THEN NULL
        WHEN v::numeric < -9223372036854775808 OR v::numeric > 9223372036854775807 THEN NULL
        ELSE v::numeric::bigint
    END
$$;

-- args[k] as bigint: 0 when absent or null, NULL when not an integer.
CREATE FUNCTION registry.s_int(p jsonb, k text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN 0
        WHEN jsonb_typeof(p -> k) = 'null' THEN 0
        ELSE registry.s_jint(p -> k)
    END
$$;

-- args[k] as a uint64 (a JSON integer, or a decimal string as pbjson writes
-- values above INT64_MAX), stored in bigint two's-complement like a C cast.
CREATE FUNCTION registry.s_u64(p jsonb, k text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN 0
        WHEN jsonb_typeof(p -> k) = 'null' THEN 0
        WHEN jsonb_typeof(p -> k) = 'number' THEN
            CASE
                WHEN (p -> k)::numeric % 1 <> 0 THEN NULL
                WHEN (p -> k)::numeric < 0 OR (p -> k)::numeric > 18446744073709551615 THEN NULL
                WHEN (p -> k)::numeric > 9223372036854775807
                    THEN ((p -> k)::numeric - 18446744073709551616)::bigint
                ELSE (p -> k)::numeric::bigint
            END
        WHEN jsonb_typeof(p -> k) = 'string' THEN
            CASE
                WHEN (p ->> k) !~ '^[0-9]{1,20}$' THEN NULL
                WHEN (p ->> k)::numeric > 18446744073709551615 THEN NULL
                WHEN (p ->> k)::numeric > 9223372036854775807
                    THEN ((p ->> k)::numeric - 18446744073709551616)::bigint
                ELSE (p ->> k)::numeric::bigint
            END
        ELSE NULL
    END
$$;

-- args[k] as text: '' when absent or null, NULL when not a string.
CREATE FUNCTION registry.s_text(p jsonb, k text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN ''
        WHEN jsonb_typeof(p -> k) = 'null' THEN ''
        WHEN jsonb_typeof(p -> k) = 'string' THEN p ->> k
        ELSE NULL
    END
$$;

-- args[k] as boolean: false when absent or null, NULL when not a boolean.
CREATE FUNCTION registry.s_bool(p jsonb, k text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN false
        WHEN jsonb_typeof(p -> k) = 'null' THEN false
        WHEN jsonb_typeof(p -> k) = 'boolean' THEN (p -> k)::boolean
        ELSE NULL
    END
$$;

-- args[k] as bigint[] in order: '{}' when absent or null, NULL when not an
-- array of integers.
CREATE FUNCTION registry.s_int_array(p jsonb, k text) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN '{}'::bigint[]
        WHEN jsonb_typeof(p -> k) = 'null' THEN '{}'::bigint[]
        WHEN jsonb_typeof(p -> k) <> 'array' THEN NULL
        ELSE (SELECT CASE WHEN coalesce(bool_and(registry.s_jint(e) IS NOT NULL), true)
                          THEN coalesce(array_agg(registry.s_jint(e) ORDER BY i), '{}')
                     END
                FROM jsonb_array_elements(p -> k) WITH ORDINALITY AS t (e, i))
    END
$$;

-- args[k] as text[] in order: '{}' when absent or null, NULL when not an
-- array of strings.
CREATE FUNCTION registry.s_text_array(p jsonb, k text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p -> k IS NULL THEN '{}'::text[]
        WHEN jsonb_typeof(p -> k) = 'null' THEN '{}'::text[]
        WHEN jsonb_typeof(p -> k) <> 'array' THEN NULL
        ELSE (SELECT CASE WHEN coalesce(bool_and(jsonb_typeof(e) = 'string'), true)
                          THEN coalesce(array_agg(e #>> '{}' ORDER BY i), '{}')
                     END
                FROM jsonb_array_elements(p -> k) WITH ORDINALITY AS t (e, i))
    END
$$;

-- ctx.now in ms; the database clock only when the caller sent none.
CREATE FUNCTION registry.s_now(p_ctx jsonb) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(registry.s_jint(p_ctx -> 'now'),
                    (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
$$;

CREATE FUNCTION registry.s_err(p_code text, p_message text) RETURNS registry.cmd_result
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW(p_code, p_message, '{}'::jsonb)::registry.cmd_result
$$;

CREATE FUNCTION registry.s_ok(p_message text, p_result jsonb) RETURNS registry.cmd_result
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW('ok', p_message, p_result)::registry.cmd_result
$$;

-- ------------------------------------------------------------ events

-- Takes the stream's write turn for this transaction (see the outbox table)
-- and returns the number of its newest event, this transaction's included.
-- Cheap when the transaction holds the turn already. Relies on READ
-- COMMITTED (the default): after waiting for the turn, max(seq) is read with
-- a fresh snapshot that sees the previous holder's events.
CREATE FUNCTION registry.s_outbox_turn() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM registry.outbox_stream WHERE stream = 'registry' FOR UPDATE;
    IF NOT FOUND THEN
        -- without its row there is no ordering lock: never write unordered
        RAISE EXCEPTION 'outbox stream registry is missing' USING ERRCODE = 'P0002';
    END IF;
    RETURN coalesce((SELECT max(seq) FROM registry.outbox WHERE stream = 'registry'), 0);
END
$$;

-- Appends one event to the outbox with the stream's next number. type is
-- the Event oneof member name, payload has the event message's field names.
CREATE FUNCTION registry.s_emit(p_type text, p_community_id bigint, p_occurred_at bigint,
                                p_payload jsonb, p_ctx jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO registry.outbox (seq, type, community_id, trace_id, occurred_at, payload)
    VALUES (registry.s_outbox_turn() + 1, p_type, p_community_id,
            coalesce(p_ctx ->> 'trace_id', ''), p_occurred_at, p_payload);
END
$$;

-- ------------------------------------------------------------ seats

-- While the group at the head of the activity's waiting list fits in the
-- free seats, offers it those seats (held in taken until the offer closes).
-- The caller holds the activity row lock. Returns the first offer made, or 0.
CREATE FUNCTION registry.s_offer_onward(p_activity_id bigint, p_now bigint, p_ctx jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_community  bigint;
    v_capacity   integer;
    v_taken      integer;
    v_ttl        integer;
    v_group      bigint;
    v_size       integer;
    v_person     bigint;
    v_expires    bigint;
    v_offer      bigint;
    v_first      bigint := 0;
BEGIN
    SELECT community_id, capacity, taken, offer_ttl_seconds
      INTO v_community, v_capacity, v_taken, v_ttl
      FROM registry.activities WHERE id = p_activity_id;
    LOOP
        SELECT id, size INTO v_group, v_size
          FROM registry.wait_groups
         WHERE activity_id = p_activity_id AND status = 'waiting'
         ORDER BY id LIMIT 1;
        -- first come first served: a head group that does not fit blocks the rest
        EXIT WHEN NOT FOUND OR v_taken + v_size > v_capacity;

        SELECT person_id INTO v_person
          FROM registry.signups
         WHERE group_id = v_group AND status = 'waitlisted'
         ORDER BY id LIMIT 1;
        v_expires := p_now + v_ttl::bigint * 1000;
        INSERT INTO registry.offers (activity_id, community_id, group_id, first_person_id,
                                     seats, made_at, expires_at)
        VALUES (p_activity_id, v_community, v_group, v_person, v_size, p_now, v_expires)
        RETURNING id INTO v_offer;
        UPDATE registry.wait_groups SET status = 'offered' WHERE id = v_group;
        UPDATE registry.signups SET status = 'offered', updated_at = p_now
         WHERE group_id = v_group AND status = 'waitlisted';
        UPDATE registry.activities SET taken = taken + v_size WHERE id = p_activity_id;
        v_taken := v_taken + v_size;
        PERFORM registry.s_emit('offer_made', v_community, p_now,
            jsonb_build_object('offer_id', v_offer, 'activity_id', p_activity_id,
                               'person_id', v_person, 'community_id', v_community,
                               'expires_at', v_expires), p_ctx);
        IF v_first = 0 THEN
            v_first := v_offer;
        END IF;
    END LOOP;
    RETURN v_first;
END
$$;

-- Closes an open offer as 'declined' or 'expired': its people's sign-ups end
-- with that status and its seats are released. Does not offer onward. The
-- caller holds the activity row lock and has checked the offer is open.
CREATE FUNCTION registry.s_release_offer(p_offer_id bigint, p_outcome text, p_now bigint,
                                         p_ctx jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    o registry.offers;
BEGIN
    UPDATE registry.offers SET status = p_outcome, closed_at = p_now
     WHERE id = p_offer_id AND status = 'open'
    RETURNING * INTO o;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE registry.signups SET status = p_outcome, updated_at = p_now
     WHERE group_id = o.group_id AND status = 'offered';
    UPDATE registry.wait_groups SET status = 'done' WHERE id = o.group_id;
    UPDATE registry.activities SET taken = taken - o.seats WHERE id = o.activity_id;
    PERFORM registry.s_emit('offer_closed', o.community_id, p_now,
        jsonb_build_object('offer_id', o.id, 'activity_id', o.activity_id,
                           'person_id', o.first_person_id, 'community_id', o.community_id,
                           'outcome', p_outcome), p_ctx);
END
$$;

-- ------------------------------------------------------------ commands

CREATE FUNCTION registry.cmd_create_community(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now       bigint := registry.s_now(p_ctx);
    v_name      text := registry.s_text(p_args, 'name');
    v_district  text := registry.s_text(p_args, 'district');
    v_city      text := registry.s_text(p_args, 'city');
    v_id        bigint;
BEGIN
    IF v_name IS NULL OR v_district IS NULL OR v_city IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'name, district and city must be strings.');
    ELSIF octet_length(v_name) NOT BETWEEN 1 AND 128 THEN
        RETURN registry.s_err('invalid_argument', 'name must be 1 to 128 bytes.');
    ELSIF octet_length(v_district) > 128 OR octet_length(v_city) > 128 THEN
        RETURN registry.s_err('invalid_argument', 'district and city must be at most 128 bytes.');
    END IF;
    -- ON CONFLICT waits for a concurrent insert of the same name instead of raising
    INSERT INTO registry.communities (name, district, city, created_at)
    VALUES (v_name, v_district, v_city, v_now)
    ON CONFLICT (name) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN registry.s_err('already_exists', 'A community with this name already exists.');
    END IF;
    PERFORM registry.s_emit('community_created', v_id, v_now,
        jsonb_build_object('id', v_id, 'name', v_name, 'district', v_district, 'city', v_city),
        p_ctx);
    RETURN registry.s_ok('Community created.', jsonb_build_object('id', v_id));
END
$$;

CREATE FUNCTION registry.cmd_register_person(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_community  bigint := registry.s_int(p_args, 'community_id');
    v_name       text := registry.s_text(p_args, 'name');
    v_phone      text := registry.s_text(p_args, 'phone');
    v_language   text := registry.s_text(p_args, 'language');
    v_roles_in   jsonb := coalesce(p_args -> 'roles', 'null');
    v_roles      text[];
    v_bad        boolean;
    v_id         bigint;
BEGIN
    IF v_community IS NULL OR v_name IS NULL OR v_phone IS NULL OR v_language IS NULL THEN
        RETURN registry.s_err('invalid_argument',
            'community_id must be an integer and name, phone and language strings.');
    ELSIF octet_length(v_name) NOT BETWEEN 1 AND 128 THEN
        RETURN registry.s_err('invalid_argument', 'name must be 1 to 128 bytes.');
    ELSIF v_phone !~ '^[0-9+ -]{0,32}$' THEN
        RETURN registry.s_err('invalid_argument',
            'phone must be at most 32 digits, ''+'', ''-'' or spaces.');
    ELSIF octet_length(v_language) > 35 THEN
        RETURN registry.s_err('invalid_argument', 'language must be at most 35 bytes.');
    END IF;

    -- roles: enum names (or their numbers), duplicates folded, order kept
    IF jsonb_typeof(v_roles_in) = 'null' THEN
        v_roles := '{}';
    ELSIF jsonb_typeof(v_roles_in) <> 'array' THEN
        RETURN registry.s_err('invalid_argument', 'roles must be a list.');
    ELSE
        SELECT bool_or(r IS NULL), array_agg(r ORDER BY i) FILTER (WHERE r IS NOT NULL)
          INTO v_bad, v_roles
          FROM (SELECT min(i) AS i, r
                  FROM (SELECT i, CASE
                                   WHEN e IN ('"ROLE_RESIDENT"', '1') THEN 'ROLE_RESIDENT'
                                   WHEN e IN ('"ROLE_VOLUNTEER"', '2') THEN 'ROLE_VOLUNTEER'
                                   WHEN e IN ('"ROLE_ORGANISER"', '3') THEN 'ROLE_ORGANISER'
                                  END AS r
                          FROM jsonb_array_elements(v_roles_in) WITH ORDINALITY AS t (e, i)) x
                 GROUP BY r) y;
        IF v_bad THEN
            RETURN registry.s_err('invalid_argument',
                'roles must be ROLE_RESIDENT, ROLE_VOLUNTEER or ROLE_ORGANISER.');
        END IF;
        v_roles := coalesce(v_roles, '{}');
    END IF;
    IF cardinality(v_roles) = 0 THEN
        v_roles := ARRAY['ROLE_RESIDENT'];
    END IF;

    IF v_community <= 0 OR NOT EXISTS (SELECT 1 FROM registry.communities WHERE id = v_community) THEN
        RETURN registry.s_err('not_found', 'No such community.');
    END IF;

    INSERT INTO registry.people (community_id, name, phone, roles, language, created_at)
    VALUES (v_community, v_name, v_phone, v_roles, v_language, v_now)
    RETURNING id INTO v_id;
    PERFORM registry.s_emit('person_registered', v_community, v_now,
        jsonb_build_object('id', v_id, 'community_id', v_community, 'roles', to_jsonb(v_roles)),
        p_ctx);
    RETURN registry.s_ok('Person registered.', jsonb_build_object('id', v_id));
END
$$;

CREATE FUNCTION registry.cmd_create_activity(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_community  bigint := registry.s_int(p_args, 'community_id');
    v_title      text := registry.s_text(p_args, 'title');
    v_place      text := registry.s_text(p_args, 'place');
    v_zone       text := registry.s_text(p_args, 'zone');
    v_starts     bigint := registry.s_int(p_args, 'starts_at');
    v_ends       bigint := registry.s_int(p_args, 'ends_at');
    v_capacity   bigint := registry.s_int(p_args, 'capacity');
    v_opens      bigint := registry.s_int(p_args, 'signup_opens_at');
    v_closes     bigint := registry.s_int(p_args, 'signup_closes_at');
    v_ttl        bigint := registry.s_int(p_args, 'offer_ttl_seconds');
    v_auto       bigint := registry.s_int(p_args, 'auto_checkout_at');
    v_walk_in    boolean := registry.s_bool(p_args, 'walk_in');
    v_id         bigint;
BEGIN
    IF v_community IS NULL OR v_title IS NULL OR v_place IS NULL OR v_zone IS NULL
       OR v_starts IS NULL OR v_ends IS NULL OR v_capacity IS NULL OR v_opens IS NULL
       OR v_closes IS NULL OR v_ttl IS NULL OR v_auto IS NULL OR v_walk_in IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'An argument has the wrong type.');
    END IF;
    v_closes := CASE WHEN v_closes = 0 THEN v_starts ELSE v_closes END;
    v_ttl := CASE WHEN v_ttl = 0 THEN 7200 ELSE v_ttl END;
    v_auto := CASE WHEN v_auto = 0 THEN v_ends ELSE v_auto END;
    IF octet_length(v_title) NOT BETWEEN 1 AND 200 THEN
        RETURN registry.s_err('invalid_argument', 'title must be 1 to 200 bytes.');
    ELSIF octet_length(v_place) > 200 THEN
        RETURN registry.s_err('invalid_argument', 'place must be at most 200 bytes.');
    ELSIF octet_length(v_zone) > 64 THEN
        RETURN registry.s_err('invalid_argument', 'zone must be at most 64 bytes.');
    ELSIF v_starts <= 0 OR v_ends <= v_starts THEN
        RETURN registry.s_err('invalid_argument', 'starts_at must be set and before ends_at.');
    ELSIF v_capacity NOT BETWEEN 1 AND 1000000 THEN
        RETURN registry.s_err('invalid_argument', 'capacity must be 1 to 1000000.');
    ELSIF v_opens < 0 OR v_closes <= v_opens THEN
        RETURN registry.s_err('invalid_argument', 'signup_opens_at must be before signup_closes_at.');
    ELSIF v_ttl NOT BETWEEN 1 AND 2592000 THEN
        RETURN registry.s_err('invalid_argument', 'offer_ttl_seconds must be at most 30 days.');
    ELSIF v_auto <= v_starts THEN
        RETURN registry.s_err('invalid_argument', 'auto_checkout_at must be after starts_at.');
    END IF;
    IF v_community <= 0 OR NOT EXISTS (SELECT 1 FROM registry.communities WHERE id = v_community) THEN
        RETURN registry.s_err('not_found', 'No such community.');
    END IF;

    INSERT INTO registry.activities (community_id, title, place, zone, starts_at, ends_at,
                                     capacity, signup_opens_at, signup_closes_at,
                                     offer_ttl_seconds, auto_checkout_at, walk_in, created_at)
    VALUES (v_community, v_title, v_place, v_zone, v_starts, v_ends, v_capacity, v_opens,
            v_closes, v_ttl, v_auto, v_walk_in, v_now)
    RETURNING id INTO v_id;
    PERFORM registry.s_emit('activity_created', v_community, v_now,
        jsonb_build_object('id', v_id, 'community_id', v_community, 'title', v_title,
                           'capacity', v_capacity, 'starts_at', v_starts, 'ends_at', v_ends),
        p_ctx);
    RETURN registry.s_ok('Activity created.', jsonb_build_object('id', v_id));
END
$$;

-- Hot path. A household or group signs up together or not at all.
CREATE FUNCTION registry.cmd_sign_up(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_activity   bigint := registry.s_int(p_args, 'activity_id');
    v_ids        bigint[] := registry.s_int_array(p_args, 'person_ids');
    v_join       boolean := registry.s_bool(p_args, 'join_waitlist');
    v_n          integer;
    v_community  bigint;
    v_capacity   integer;
    v_taken      integer;
    v_opens      bigint;
    v_closes     bigint;
    v_group      bigint;
    v_status     text;
    v_signups    bigint[];
    v_pid        bigint;
    v_position   integer := 0;
    v_result     jsonb;
BEGIN
    IF v_activity IS NULL OR v_ids IS NULL OR v_join IS NULL THEN
        RETURN registry.s_err('invalid_argument',
            'activity_id must be an integer, person_ids a list of integers, join_waitlist a boolean.');
    END IF;
    v_n := cardinality(v_ids);
    IF v_n NOT BETWEEN 1 AND 20 THEN
        RETURN registry.s_err('invalid_argument', 'person_ids must list 1 to 20 people.');
    ELSIF v_n > 1 AND (SELECT count(DISTINCT x) FROM unnest(v_ids) AS x) <> v_n THEN
        RETURN registry.s_err('invalid_argument', 'person_ids must not repeat a person.');
    END IF;

    SELECT community_id, capacity, taken, signup_opens_at, signup_closes_at
      INTO v_community, v_capacity, v_taken, v_opens, v_closes
      FROM registry.activities WHERE id = v_activity
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN registry.s_err('not_found', 'No such activity.');
    END IF;
    IF v_n = 1 THEN
        IF NOT EXISTS (SELECT 1 FROM registry.people WHERE id = v_ids[1]) THEN
            RETURN registry.s_err('unknown_person', 'No such person.');
        END IF;
    ELSIF (SELECT count(*) FROM registry.people WHERE id = ANY (v_ids)) <> v_n THEN
        RETURN registry.s_err('unknown_person', 'Somebody in person_ids is not registered.');
    END IF;
    IF v_n > v_capacity THEN
        -- it could never be seated, and would block the waiting list
        RETURN registry.s_err('activity_full', 'The group is larger than the activity.');
    END IF;
    IF v_now < v_opens THEN
        RETURN registry.s_err('signup_not_open', 'Sign-up for this activity has not opened yet.');
    ELSIF v_now >= v_closes THEN
        RETURN registry.s_err('signup_closed', 'Sign-up for this activity has closed.');
    END IF;
    -- One probe of the unique index per person: "person_id = ANY (array)"
    -- would let a cached generic plan scan every sign-up of the activity.
    FOREACH v_pid IN ARRAY v_ids LOOP
        IF EXISTS (SELECT 1 FROM registry.signups
                    WHERE activity_id = v_activity AND person_id = v_pid
                      AND status IN ('confirmed', 'waitlisted', 'offered')) THEN
            RETURN registry.s_err('already_signed_up',
                'Somebody in the group is already signed up or waiting for this activity.');
        END IF;
    END LOOP;

    IF v_taken + v_n <= v_capacity
       AND NOT EXISTS (SELECT 1 FROM registry.wait_groups
                        WHERE activity_id = v_activity AND status = 'waiting') THEN
        UPDATE registry.activities SET taken = taken + v_n
         WHERE id = v_activity AND taken + v_n <= capacity;
        v_status := 'confirmed';
    ELSIF v_join THEN
        INSERT INTO registry.wait_groups (activity_id, community_id, size, created_at)
        VALUES (v_activity, v_community, v_n, v_now)
        RETURNING id INTO v_group;
        SELECT count(*) INTO v_position FROM registry.wait_groups
         WHERE activity_id = v_activity AND status = 'waiting' AND id <= v_group;
        v_status := 'waitlisted';
    ELSE
        RETURN registry.s_err('activity_full', 'The activity is full.');
    END IF;

    IF v_n = 1 THEN
        INSERT INTO registry.signups (activity_id, person_id, community_id, group_id, status,
                                      created_at, updated_at)
        VALUES (v_activity, v_ids[1], v_community, v_group, v_status, v_now, v_now)
        RETURNING ARRAY[id] INTO v_signups;
    ELSE
        WITH ins AS (
            INSERT INTO registry.signups (activity_id, person_id, community_id, group_id, status,
                                          created_at, updated_at)
            SELECT v_activity, x, v_community, v_group, v_status, v_now, v_now
              FROM unnest(v_ids) WITH ORDINALITY AS t (x, i)
             ORDER BY i
            RETURNING id, person_id)
        SELECT array_agg(ins.id ORDER BY array_position(v_ids, ins.person_id))
          INTO v_signups FROM ins;
    END IF;
    FOR i IN 1 .. v_n LOOP
        PERFORM registry.s_emit('signed_up', v_community, v_now,
            jsonb_build_object('signup_id', v_signups[i], 'activity_id', v_activity,
                               'person_id', v_ids[i], 'community_id', v_community,
                               'status', v_status), p_ctx);
    END LOOP;

    v_result := jsonb_build_object('status', v_status, 'signup_ids', to_jsonb(v_signups));
    IF v_status = 'waitlisted' THEN
        RETURN registry.s_ok('Added to the waiting list.',
                             v_result || jsonb_build_object('waitlist_position', v_position));
    END IF;
    RETURN registry.s_ok('Signed up.', v_result);
END
$$;

CREATE FUNCTION registry.cmd_cancel_sign_up(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_activity   bigint := registry.s_int(p_args, 'activity_id');
    v_person     bigint := registry.s_int(p_args, 'person_id');
    v_community  bigint;
    v_signup     bigint;
    v_status     text;
    v_group      bigint;
    o            registry.offers;
    v_offer      bigint;
BEGIN
    IF v_activity IS NULL OR v_person IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'activity_id and person_id must be integers.');
    END IF;
    SELECT community_id INTO v_community
      FROM registry.activities WHERE id = v_activity
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN registry.s_err('not_found', 'No such activity.');
    END IF;
    SELECT id, status, group_id INTO v_signup, v_status, v_group
      FROM registry.signups
     WHERE activity_id = v_activity AND person_id = v_person
       AND status IN ('confirmed', 'waitlisted', 'offered');
    IF NOT FOUND THEN
        RETURN registry.s_err('not_signed_up', 'This person is not signed up for this activity.');
    END IF;

    UPDATE registry.signups SET status = 'cancelled', updated_at = v_now WHERE id = v_signup;
    IF v_status = 'confirmed' THEN
        UPDATE registry.activities SET taken = taken - 1 WHERE id = v_activity;
    ELSE
        UPDATE registry.wait_groups
           SET size = size - 1,
               status = CASE WHEN size > 1 THEN status
                             WHEN status = 'waiting' THEN 'cancelled' ELSE 'done' END
         WHERE id = v_group;
    END IF;
    PERFORM registry.s_emit('sign_up_cancelled', v_community, v_now,
        jsonb_build_object('activity_id', v_activity, 'person_id', v_person,
                           'community_id', v_community,
                           'was_confirmed', v_status = 'confirmed'), p_ctx);
    IF v_status = 'offered' THEN
        -- one of the offer's people leaves: its seat goes back; the offer
        -- closes (as declined) when nobody is left in it
        UPDATE registry.offers
           SET seats = seats - 1,
               status = CASE WHEN seats > 1 THEN status ELSE 'declined' END,
               closed_at = CASE WHEN seats > 1 THEN NULL ELSE v_now END
         WHERE group_id = v_group AND status = 'open'
        RETURNING * INTO o;
        UPDATE registry.activities SET taken = taken - 1 WHERE id = v_activity;
        IF o.status = 'declined' THEN
            PERFORM registry.s_emit('offer_closed', o.community_id, v_now,
                jsonb_build_object('offer_id', o.id, 'activity_id', o.activity_id,
                                   'person_id', o.first_person_id,
                                   'community_id', o.community_id, 'outcome', 'declined'), p_ctx);
        END IF;
    END IF;
    v_offer := registry.s_offer_onward(v_activity, v_now, p_ctx);
    RETURN registry.s_ok('Sign-up cancelled.', jsonb_build_object('offer_id', v_offer));
END
$$;

CREATE FUNCTION registry.cmd_respond_offer(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now       bigint := registry.s_now(p_ctx);
    v_offer_id  bigint := registry.s_int(p_args, 'offer_id');
    v_accept    boolean := registry.s_bool(p_args, 'accept');
    v_activity  bigint;
    o           registry.offers;
    r           record;
    v_next      bigint;
BEGIN
    IF v_offer_id IS NULL OR v_accept IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'offer_id must be an integer and accept a boolean.');
    END IF;
    SELECT activity_id INTO v_activity FROM registry.offers WHERE id = v_offer_id;
    IF NOT FOUND THEN
        RETURN registry.s_err('not_found', 'No such offer.');
    END IF;
    -- lock order everywhere: the activity, then its offers
    PERFORM 1 FROM registry.activities WHERE id = v_activity FOR NO KEY UPDATE;
    SELECT * INTO o FROM registry.offers WHERE id = v_offer_id FOR UPDATE;
    IF o.status <> 'open' THEN
        RETURN registry.s_err('offer_closed', 'This offer is no longer open.');
    ELSIF v_now >= o.expires_at THEN
        RETURN registry.s_err('offer_expired', 'This offer has expired.');
    END IF;

    IF NOT v_accept THEN
        PERFORM registry.s_release_offer(o.id, 'declined', v_now, p_ctx);
        v_next := registry.s_offer_onward(o.activity_id, v_now, p_ctx);
        RETURN registry.s_ok('Offer declined.',
                             jsonb_build_object('status', 'declined', 'next_offer_id', v_next));
    END IF;

    -- accept: the seats are already held in taken
    UPDATE registry.offers SET status = 'accepted', closed_at = v_now WHERE id = o.id;
    UPDATE registry.wait_groups SET status = 'done' WHERE id = o.group_id;
    PERFORM registry.s_emit('offer_closed', o.community_id, v_now,
        jsonb_build_object('offer_id', o.id, 'activity_id', o.activity_id,
                           'person_id', o.first_person_id, 'community_id', o.community_id,
                           'outcome', 'accepted'), p_ctx);
    FOR r IN
        UPDATE registry.signups SET status = 'confirmed', updated_at = v_now
         WHERE group_id = o.group_id AND status = 'offered'
        RETURNING id, person_id
    LOOP
        PERFORM registry.s_emit('signed_up', o.community_id, v_now,
            jsonb_build_object('signup_id', r.id, 'activity_id', o.activity_id,
                               'person_id', r.person_id, 'community_id', o.community_id,
                               'status', 'confirmed'), p_ctx);
    END LOOP;
    RETURN registry.s_ok('Offer accepted.',
                         jsonb_build_object('status', 'accepted', 'next_offer_id', 0));
END
$$;

CREATE FUNCTION registry.cmd_issue_token(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_activity   bigint := registry.s_int(p_args, 'activity_id');
    v_station    bigint := registry.s_int(p_args, 'station_id');
    v_valid      bigint := registry.s_int(p_args, 'valid_seconds');
    v_kind       text;
    v_id         bigint;
    v_community  bigint;
BEGIN
    IF v_activity IS NULL OR v_station IS NULL OR v_valid IS NULL THEN
        RETURN registry.s_err('invalid_argument',
            'activity_id, station_id and valid_seconds must be integers.');
    ELSIF v_activity < 0 OR v_station < 0 OR (v_activity > 0) = (v_station > 0) THEN
        RETURN registry.s_err('invalid_argument', 'Give exactly one of activity_id and station_id.');
    END IF;
    v_valid := CASE WHEN v_valid = 0 THEN 86400 ELSE v_valid END;
    IF v_valid NOT BETWEEN 60 AND 2592000 THEN
        RETURN registry.s_err('invalid_argument', 'valid_seconds must be 60 to 2592000.');
    END IF;
    IF v_activity > 0 THEN
        v_kind := 'a';
        v_id := v_activity;
        SELECT community_id INTO v_community FROM registry.activities WHERE id = v_activity;
    ELSE
        v_kind := 's';
        v_id := v_station;
        SELECT community_id INTO v_community FROM registry.stations WHERE id = v_station;
    END IF;
    IF v_community IS NULL THEN
        RETURN registry.s_err('not_found',
            CASE v_kind WHEN 'a' THEN 'No such activity.' ELSE 'No such station.' END);
    END IF;
    -- the daemon signs these claims with its secret; nothing is stored here
    RETURN registry.s_ok('Token issued.',
        jsonb_build_object('kind', v_kind, 'id', v_id, 'community_id', v_community,
                           'expires_at', v_now + v_valid * 1000));
END
$$;

-- ------------------------------------------------------------ scans

CREATE FUNCTION registry.s_scan_message(p_reason text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_reason
        WHEN 'token_malformed' THEN 'This is not a Linli check-in code.'
        WHEN 'token_forged' THEN 'This code was not issued by Linli.'
        WHEN 'token_expired' THEN 'This code has expired.'
        WHEN 'wrong_activity' THEN 'This code is for another activity or station.'
        WHEN 'unknown_person' THEN 'No such person.'
        WHEN 'not_signed_up' THEN 'This person has no confirmed sign-up for the activity.'
        WHEN 'already_checked_in' THEN 'Already checked in.'
        WHEN 'not_checked_in' THEN 'This person is not checked in.'
        WHEN 'not_found' THEN 'The activity or station does not exist.'
        WHEN 'invalid_argument' THEN 'Route stations take entry scans only.'
        ELSE 'Scan refused.'
    END
$$;

-- The reply for a scan, from what its scans row records, so a repeated nonce
-- gets exactly the first reply.
CREATE FUNCTION registry.s_scan_reply(p_kind "char", p_exit boolean, p_accepted boolean,
                                      p_checkin_id bigint, p_reason text, p_stamps integer,
                                      p_stations integer) RETURNS registry.cmd_result
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_accepted AND p_kind = 's' THEN
            ROW('ok', 'Stamp collected.',
                jsonb_build_object('accepted', true, 'checkin_id', p_checkin_id,
                                   'stamps', p_stamps, 'stations', p_stations))::registry.cmd_result
        WHEN p_accepted THEN
            ROW('ok', CASE WHEN p_exit THEN 'Checked out.' ELSE 'Checked in.' END,
                jsonb_build_object('accepted', true, 'checkin_id', p_checkin_id))::registry.cmd_result
        WHEN p_stations > 0 THEN
            ROW(p_reason, CASE WHEN p_reason = 'already_checked_in' THEN 'Stamp already collected.'
                               ELSE registry.s_scan_message(p_reason) END,
                jsonb_build_object('accepted', false, 'reason', p_reason,
                                   'stamps', p_stamps, 'stations', p_stations))::registry.cmd_result
        ELSE
            ROW(p_reason, registry.s_scan_message(p_reason),
                jsonb_build_object('accepted', false, 'reason', p_reason))::registry.cmd_result
    END
$$;

-- Hot path: one QR scan whose token the daemon has already verified.
-- args: the Scan fields plus verdict ('ok', 'malformed', 'forged',
-- 'expired') and, for ok and expired, the token's kind, subject_id and
-- community_id. Every scan that gets past argument checks is recorded in
-- registry.scans; a refusal returns code = reason.
CREATE FUNCTION registry.cmd_scan(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_verdict    text := registry.s_text(p_args, 'verdict');
    v_kind       text := registry.s_text(p_args, 'kind');
    v_subject    bigint := registry.s_int(p_args, 'subject_id');
    v_community  bigint := registry.s_int(p_args, 'community_id');
    v_person     bigint := registry.s_int(p_args, 'person_id');
    v_device     text := registry.s_text(p_args, 'device_id');
    v_counter    bigint := registry.s_u64(p_args, 'counter');
    v_at         bigint := registry.s_int(p_args, 'scanned_at');
    v_expected   bigint := registry.s_int(p_args, 'expected_id');
    v_direction  jsonb := p_args -> 'direction';
    v_exit       boolean;
    v_reason     text := '';
    v_checkin    bigint := 0;
    v_stamps     integer := 0;
    v_stations   integer := 0;
    v_subj_comm  bigint;
    v_person_ok  boolean;
    v_allowed    boolean;
    v_open       bigint;
    v_auto       bigint;
    v_out        bigint;
    v_route      bigint;
    v_has_stamp  boolean;
    s            record;
BEGIN
    v_exit := CASE
        WHEN v_direction IS NULL OR v_direction IN ('null', '"DIRECTION_ENTRY"', '0') THEN false
        WHEN v_direction IN ('"DIRECTION_EXIT"', '1') THEN true
    END;
    IF v_verdict IS NULL OR v_kind IS NULL OR v_subject IS NULL OR v_community IS NULL
       OR v_person IS NULL OR v_device IS NULL OR v_counter IS NULL OR v_at IS NULL
       OR v_expected IS NULL OR v_exit IS NULL
       OR v_verdict NOT IN ('ok', 'malformed', 'forged', 'expired')
       OR (v_verdict IN ('ok', 'expired') AND (v_kind NOT IN ('a', 's') OR v_subject <= 0))
       OR octet_length(v_device) > 64 OR v_at < 0 THEN
        RETURN ROW('invalid_argument', 'The scan has a missing or malformed field.',
                   '{"accepted": false, "reason": "invalid_argument"}'::jsonb)::registry.cmd_result;
    END IF;
    IF v_at = 0 THEN
        v_at := v_now;
    END IF;

    -- a repeated nonce gets the first reply and changes nothing
    IF v_device <> '' THEN
        SELECT kind, exit, accepted, checkin_id, reason, stamps, stations INTO s
          FROM registry.scans
         WHERE device_id = v_device AND counter = v_counter
           AND device_id <> '';  -- lets a generic plan use the partial index
        IF FOUND THEN
            RETURN registry.s_scan_reply(s.kind, s.exit, s.accepted, s.checkin_id, s.reason,
                                         s.stamps, s.stations);
        END IF;
    END IF;

    IF v_verdict <> 'ok' THEN
        v_reason := 'token_' || v_verdict;
        IF v_verdict <> 'expired' THEN
            v_kind := '';        -- an unreadable or forged token names nothing we trust
            v_subject := 0;
            v_community := 0;
        END IF;
    ELSIF v_expected > 0 AND v_expected <> v_subject THEN
        v_reason := 'wrong_activity';
    ELSIF v_kind = 'a' THEN
        -- every lookup in one statement: activity, person, sign-up, open check-in
        SELECT a.community_id, a.auto_checkout_at,
               EXISTS (SELECT 1 FROM registry.people p WHERE p.id = v_person),
               a.walk_in OR EXISTS (SELECT 1 FROM registry.signups u
                                     WHERE u.activity_id = v_subject AND u.person_id = v_person
                                       AND u.status = 'confirmed'),
               (SELECT c.id FROM registry.checkins c
                 WHERE c.activity_id = v_subject AND c.person_id = v_person
                   AND c.checked_out_at IS NULL)
          INTO v_subj_comm, v_auto, v_person_ok, v_allowed, v_open
          FROM registry.activities a WHERE a.id = v_subject;
        IF NOT FOUND THEN
            v_reason := 'not_found';
        ELSE
            v_community := v_subj_comm;
            IF NOT v_person_ok THEN
                v_reason := 'unknown_person';
            ELSIF NOT v_exit THEN
                IF NOT v_allowed THEN
                    v_reason := 'not_signed_up';
                ELSIF v_open IS NOT NULL THEN
                    v_reason := 'already_checked_in';
                ELSE
                    INSERT INTO registry.checkins (community_id, activity_id, person_id, device_id,
                                                   checked_in_at, auto_checkout_at)
                    VALUES (v_community, v_subject, v_person, v_device, v_at, v_auto)
                    RETURNING id INTO v_checkin;
                    PERFORM registry.s_emit('checked_in', v_community, v_at,
                        jsonb_build_object('checkin_id', v_checkin, 'activity_id', v_subject,
                                           'person_id', v_person, 'community_id', v_community,
                                           'at', v_at, 'device_id', v_device), p_ctx);
                END IF;
            ELSIF v_open IS NULL THEN
                v_reason := 'not_checked_in';
            ELSE
                -- an offline exit may be uploaded with a time before its entry
                UPDATE registry.checkins
                   SET checked_out_at = greatest(v_at, checked_in_at), automatic = false
                 WHERE id = v_open
                RETURNING checked_out_at INTO v_out;
                v_checkin := v_open;
                PERFORM registry.s_emit('checked_out', v_community, v_out,
                    jsonb_build_object('checkin_id', v_checkin, 'activity_id', v_subject,
                                       'person_id', v_person, 'community_id', v_community,
                                       'at', v_out, 'automatic', false), p_ctx);
            END IF;
        END IF;
    ELSE
        SELECT st.community_id, st.route_id, r.stations,
               EXISTS (SELECT 1 FROM registry.people p WHERE p.id = v_person),
               (SELECT count(*) FROM registry.stamps m
                 WHERE m.route_id = st.route_id AND m.person_id = v_person),
               EXISTS (SELECT 1 FROM registry.stamps m
                        WHERE m.route_id = st.route_id AND m.person_id = v_person
                          AND m.station_id = v_subject)
          INTO v_subj_comm, v_route, v_stations, v_person_ok, v_stamps, v_has_stamp
          FROM registry.stations st JOIN registry.routes r ON r.id = st.route_id
         WHERE st.id = v_subject;
        IF NOT FOUND THEN
            -- SELECT INTO left every target NULL
            v_reason := 'not_found';
            v_stamps := 0;
            v_stations := 0;
        ELSE
            v_community := v_subj_comm;
            IF NOT v_person_ok THEN
                v_reason := 'unknown_person';
                v_stamps := 0;
                v_stations := 0;
            ELSIF v_exit THEN
                v_reason := 'invalid_argument';
            ELSIF v_has_stamp THEN
                v_reason := 'already_checked_in';
            ELSE
                INSERT INTO registry.checkins (community_id, station_id, route_id, person_id,
                                               device_id, checked_in_at, checked_out_at)
                VALUES (v_community, v_subject, v_route, v_person, v_device, v_at, v_at)
                RETURNING id INTO v_checkin;
                INSERT INTO registry.stamps (route_id, person_id, station_id, community_id,
                                             checkin_id, collected_at)
                VALUES (v_route, v_person, v_subject, v_community, v_checkin, v_at);
                v_stamps := v_stamps + 1;
                PERFORM registry.s_emit('checked_in', v_community, v_at,
                    jsonb_build_object('checkin_id', v_checkin, 'station_id', v_subject,
                                       'route_id', v_route, 'person_id', v_person,
                                       'community_id', v_community, 'at', v_at,
                                       'device_id', v_device), p_ctx);
                PERFORM registry.s_emit('stamp_collected', v_community, v_at,
                    jsonb_build_object('route_id', v_route, 'station_id', v_subject,
                                       'person_id', v_person, 'community_id', v_community,
                                       'stamps', v_stamps, 'stations', v_stations), p_ctx);
            END IF;
        END IF;
    END IF;

    IF v_reason <> '' THEN
        PERFORM registry.s_emit('scan_refused', v_community, v_at,
            jsonb_build_object(CASE WHEN v_kind = 's' THEN 'station_id' ELSE 'activity_id' END,
                               v_subject, 'person_id', v_person, 'community_id', v_community,
                               'reason', v_reason, 'at', v_at), p_ctx);
    END IF;
    INSERT INTO registry.scans (device_id, counter, person_id, kind, subject_id, community_id,
                                exit, expected_id, verdict, scanned_at, received_at, accepted,
                                reason, checkin_id, stamps, stations)
    VALUES (v_device, v_counter, v_person, nullif(v_kind, '')::"char", v_subject, v_community,
            v_exit, v_expected, v_verdict, v_at, v_now, v_reason = '', v_reason, v_checkin,
            v_stamps, v_stations);
    RETURN registry.s_scan_reply(nullif(v_kind, '')::"char", v_exit, v_reason = '', v_checkin,
                                 v_reason, v_stamps, v_stations);
END
$$;

-- Scans a device stored offline, each handled exactly as cmd_scan in order.
CREATE FUNCTION registry.cmd_upload_scans(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_scans    jsonb := p_args -> 'scans';
    v_n        integer;
    v_results  jsonb[] := '{}';
    v_scan     jsonb;
BEGIN
    IF v_scans IS NULL OR jsonb_typeof(v_scans) <> 'array' THEN
        RETURN registry.s_err('invalid_argument', 'scans must be a list of 1 to 500 scans.');
    END IF;
    v_n := jsonb_array_length(v_scans);
    IF v_n NOT BETWEEN 1 AND 500 THEN
        RETURN registry.s_err('invalid_argument', 'scans must be a list of 1 to 500 scans.');
    ELSIF EXISTS (SELECT 1 FROM jsonb_array_elements(v_scans) AS e
                   WHERE jsonb_typeof(e) <> 'object') THEN
        RETURN registry.s_err('invalid_argument', 'Each scan must be an object.');
    END IF;
    FOR v_scan IN SELECT e FROM jsonb_array_elements(v_scans) AS e LOOP
        v_results := v_results || (registry.cmd_scan(v_scan, p_ctx)).result;
    END LOOP;
    RETURN registry.s_ok('Scans processed.',
                         jsonb_build_object('results', to_jsonb(v_results)));
END
$$;

CREATE FUNCTION registry.cmd_create_route(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_community  bigint := registry.s_int(p_args, 'community_id');
    v_name       text := registry.s_text(p_args, 'name');
    v_reward     text := registry.s_text(p_args, 'reward');
    v_stations   text[] := registry.s_text_array(p_args, 'stations');
    v_id         bigint;
    v_ids        bigint[];
BEGIN
    IF v_community IS NULL OR v_name IS NULL OR v_reward IS NULL OR v_stations IS NULL THEN
        RETURN registry.s_err('invalid_argument',
            'community_id must be an integer, name and reward strings, stations a list of strings.');
    ELSIF octet_length(v_name) NOT BETWEEN 1 AND 128 THEN
        RETURN registry.s_err('invalid_argument', 'name must be 1 to 128 bytes.');
    ELSIF octet_length(v_reward) > 200 THEN
        RETURN registry.s_err('invalid_argument', 'reward must be at most 200 bytes.');
    ELSIF cardinality(v_stations) NOT BETWEEN 1 AND 50 THEN
        RETURN registry.s_err('invalid_argument', 'stations must list 1 to 50 stations.');
    ELSIF EXISTS (SELECT 1 FROM unnest(v_stations) AS x WHERE octet_length(x) NOT BETWEEN 1 AND 128) THEN
        RETURN registry.s_err('invalid_argument', 'Each station name must be 1 to 128 bytes.');
    END IF;
    IF v_community <= 0 OR NOT EXISTS (SELECT 1 FROM registry.communities WHERE id = v_community) THEN
        RETURN registry.s_err('not_found', 'No such community.');
    END IF;

    INSERT INTO registry.routes (community_id, name, reward, stations, created_at)
    VALUES (v_community, v_name, v_reward, cardinality(v_stations), v_now)
    RETURNING id INTO v_id;
    WITH ins AS (
        INSERT INTO registry.stations (route_id, community_id, position, name)
        SELECT v_id, v_community, i, x
          FROM unnest(v_stations) WITH ORDINALITY AS t (x, i)
         ORDER BY i
        RETURNING id, position)
    SELECT array_agg(ins.id ORDER BY ins.position) INTO v_ids FROM ins;
    RETURN registry.s_ok('Route created.',
                         jsonb_build_object('id', v_id, 'station_ids', to_jsonb(v_ids)));
END
$$;

CREATE FUNCTION registry.cmd_redeem_route(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now        bigint := registry.s_now(p_ctx);
    v_route      bigint := registry.s_int(p_args, 'route_id');
    v_person     bigint := registry.s_int(p_args, 'person_id');
    r            registry.routes;
    v_stamps     integer;
    v_id         bigint;
BEGIN
    IF v_route IS NULL OR v_person IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'route_id and person_id must be integers.');
    END IF;
    SELECT * INTO r FROM registry.routes WHERE id = v_route;
    IF NOT FOUND THEN
        RETURN registry.s_err('not_found', 'No such route.');
    ELSIF NOT EXISTS (SELECT 1 FROM registry.people WHERE id = v_person) THEN
        RETURN registry.s_err('unknown_person', 'No such person.');
    END IF;
    SELECT count(*) INTO v_stamps FROM registry.stamps
     WHERE route_id = v_route AND person_id = v_person;
    IF v_stamps < r.stations THEN
        RETURN registry.s_err('route_incomplete',
            format('%s of %s stamps collected; the route is not complete.', v_stamps, r.stations));
    END IF;
    -- the unique (route_id, person_id) decides, also against a concurrent redeem
    INSERT INTO registry.redemptions (route_id, person_id, community_id, reward, redeemed_at)
    VALUES (v_route, v_person, r.community_id, r.reward, v_now)
    ON CONFLICT (route_id, person_id) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN registry.s_err('already_redeemed', 'This route''s reward has already been redeemed.');
    END IF;
    PERFORM registry.s_emit('route_redeemed', r.community_id, v_now,
        jsonb_build_object('redemption_id', v_id, 'route_id', v_route, 'person_id', v_person,
                           'community_id', r.community_id, 'reward', r.reward), p_ctx);
    RETURN registry.s_ok('Reward redeemed.',
                         jsonb_build_object('redemption_id', v_id, 'reward', r.reward));
END
$$;

-- Read-only: never logged under an idempotency key.
CREATE FUNCTION registry.cmd_get_activity(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_activity  bigint := registry.s_int(p_args, 'activity_id');
    v_info      jsonb;
BEGIN
    IF v_activity IS NULL THEN
        RETURN registry.s_err('invalid_argument', 'activity_id must be an integer.');
    END IF;
    SELECT jsonb_build_object(
               'id', a.id, 'community_id', a.community_id, 'title', a.title,
               'capacity', a.capacity, 'taken', a.taken,
               'waiting', (SELECT count(*) FROM registry.signups u
                            WHERE u.activity_id = a.id AND u.status = 'waitlisted'),
               'checked_in', (SELECT count(*) FROM registry.checkins c
                               WHERE c.activity_id = a.id AND c.checked_out_at IS NULL),
               'offers_open', (SELECT count(*) FROM registry.offers o
                                WHERE o.activity_id = a.id AND o.status = 'open'))
      INTO v_info
      FROM registry.activities a WHERE a.id = v_activity;
    IF v_info IS NULL THEN
        RETURN registry.s_err('not_found', 'No such activity.');
    END IF;
    RETURN registry.s_ok('Activity found.', v_info);
END
$$;

-- Expires offers that are due (passing their seats on) and checks out
-- everyone still in after an activity's auto_checkout_at. Both scans go
-- through small partial indexes, so a sweep with nothing due is cheap.
CREATE FUNCTION registry.cmd_sweep(p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_now      bigint := registry.s_int(p_args, 'now');
    v_expired  integer := 0;
    v_out      integer := 0;
    r          record;
BEGIN
    IF v_now IS NULL OR v_now < 0 THEN
        RETURN registry.s_err('invalid_argument', 'now must be a non-negative integer.');
    ELSIF v_now = 0 THEN
        v_now := registry.s_now(p_ctx);
    END IF;

    FOR r IN
        SELECT id, activity_id FROM registry.offers
         WHERE status = 'open' AND expires_at <= v_now
         ORDER BY activity_id, id
    LOOP
        PERFORM 1 FROM registry.activities WHERE id = r.activity_id FOR NO KEY UPDATE;
        -- re-check under the lock: it may have been answered meanwhile
        PERFORM 1 FROM registry.offers
          WHERE id = r.id AND status = 'open' AND expires_at <= v_now FOR UPDATE;
        IF FOUND THEN
            PERFORM registry.s_release_offer(r.id, 'expired', v_now, p_ctx);
            PERFORM registry.s_offer_onward(r.activity_id, v_now, p_ctx);
            v_expired := v_expired + 1;
        END IF;
    END LOOP;

    FOR r IN
        UPDATE registry.checkins
           SET checked_out_at = greatest(auto_checkout_at, checked_in_at), automatic = true
         WHERE checked_out_at IS NULL AND auto_checkout_at <= v_now
        RETURNING id, activity_id, person_id, community_id, checked_out_at
    LOOP
        PERFORM registry.s_emit('checked_out', r.community_id, r.checked_out_at,
            jsonb_build_object('checkin_id', r.id, 'activity_id', r.activity_id,
                               'person_id', r.person_id, 'community_id', r.community_id,
                               'at', r.checked_out_at, 'automatic', true), p_ctx);
        v_out := v_out + 1;
    END LOOP;
    RETURN registry.s_ok('Sweep done.',
                         jsonb_build_object('offers_expired', v_expired, 'checked_out', v_out));
END
$$;

-- ------------------------------------------------------------ entry point

-- Runs command p_name with p_args at ctx.now. With an idempotency key the
-- first reply is stored with the change and returned again on a retry.
-- Never raises for bad input; see the header of this file.
CREATE FUNCTION registry.exec(p_name text, p_key text, p_args jsonb, p_ctx jsonb)
RETURNS registry.cmd_result
LANGUAGE plpgsql AS $$
DECLARE
    v_key   text := coalesce(p_key, '');
    v_args  jsonb := coalesce(p_args, '{}');
    v_ctx   jsonb := coalesce(p_ctx, '{}');
    v_log   record;
    r       registry.cmd_result;
BEGIN
    IF v_key <> '' THEN
        IF octet_length(v_key) > 256 THEN
            RETURN registry.s_err('invalid_argument', 'The idempotency key is longer than 256 bytes.');
        END IF;
        SELECT command, code, message, result INTO v_log
          FROM registry.command_log WHERE key = v_key;
        IF FOUND THEN
            IF v_log.command IS DISTINCT FROM p_name THEN
                RETURN registry.s_err('idempotency_conflict',
                    'This idempotency key was already used for another command.');
            END IF;
            RETURN ROW(v_log.code, v_log.message, v_log.result)::registry.cmd_result;
        END IF;
    END IF;
    IF jsonb_typeof(v_args) <> 'object' THEN
        r := registry.s_err('invalid_argument', 'The arguments must be a JSON object.');
    ELSE
        r := CASE p_name
            WHEN 'scan' THEN registry.cmd_scan(v_args, v_ctx)
            WHEN 'sign_up' THEN registry.cmd_sign_up(v_args, v_ctx)
            WHEN 'upload_scans' THEN registry.cmd_upload_scans(v_args, v_ctx)
            WHEN 'cancel_sign_up' THEN registry.cmd_cancel_sign_up(v_args, v_ctx)
            WHEN 'respond_offer' THEN registry.cmd_respond_offer(v_args, v_ctx)
            WHEN 'get_activity' THEN registry.cmd_get_activity(v_args, v_ctx)
            WHEN 'sweep' THEN registry.cmd_sweep(v_args, v_ctx)
            WHEN 'issue_token' THEN registry.cmd_issue_token(v_args, v_ctx)
            WHEN 'register_person' THEN registry.cmd_register_person(v_args, v_ctx)
            WHEN 'create_activity' THEN registry.cmd_create_activity(v_args, v_ctx)
            WHEN 'create_community' THEN registry.cmd_create_community(v_args, v_ctx)
            WHEN 'create_route' THEN registry.cmd_create_route(v_args, v_ctx)
            WHEN 'redeem_route' THEN registry.cmd_redeem_route(v_args, v_ctx)
            ELSE registry.s_err('unknown_command', 'Unknown command.')
        END;
    END IF;
    IF v_key <> '' AND p_name <> 'get_activity' AND r.code <> 'unknown_command' THEN
        INSERT INTO registry.command_log (key, command, code, message, result)
        VALUES (v_key, p_name, r.code, r.message, r.result);
    END IF;
    RETURN r;
END
$$;

-- ------------------------------------------------------------ relay

-- The stream's epoch and the number of its newest committed event.
CREATE FUNCTION registry.outbox_state(p_stream text)
RETURNS TABLE (epoch bigint, last_seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.epoch, coalesce((SELECT max(o.seq) FROM registry.outbox o
                               WHERE o.stream = s.stream), 0)
      FROM registry.outbox_stream s
     WHERE s.stream = p_stream
$$;

-- Events of p_stream after sequence p_after, for subscribers catching up.
CREATE FUNCTION registry.outbox_replay(p_stream text, p_after bigint, p_limit integer)
RETURNS TABLE (seq bigint, epoch bigint, event_id uuid, type text, community_id bigint,
               trace_id text, occurred_at bigint, payload text)
LANGUAGE sql STABLE AS $$
    SELECT o.seq, s.epoch, md5(s.stream || ':' || s.epoch || ':' || o.seq)::uuid,
           o.type, o.community_id, o.trace_id, o.occurred_at, o.payload::text
      FROM registry.outbox_stream s
      JOIN registry.outbox o ON o.stream = s.stream
     WHERE s.stream = p_stream AND o.seq > p_after
     ORDER BY o.seq
     LIMIT greatest(p_limit, 0)
$$;
