-- Gifts and spends in columns, and the batch entry point.
--
-- Movements between members are the ledger's flood. The daemon sends a
-- plain gift or spend as a row of typed columns (its "lane", see
-- common/sqlcmd.h), and the batch statement is
--     SELECT i, code, message, result
--       FROM timebank.exec_batch($1::jsonb, $2::text[], ..., $11::text[])
-- where a lane command stands in $1 as a JSON null and the k-th null of $1
-- is row k of the arrays: idempotency key, ctx now, trace id, source, then
-- the command's name ('gift' or 'spend'), payer (person), payee (person; 0
-- for a pool), the pool's community (0: the payer's), minutes, service and
-- memo.
--
-- A run of lane movements is decided in one pass over the commands, in
-- order, with the balances of every account the run touches held in arrays
-- (under the accounts' row locks), and written with one statement per
-- table: a movement costs its rows and index entries, not a PL/pgSQL call
-- per row. The replies, balances, entries with their running balances,
-- events and idempotency records are those of running each command through
-- timebank.exec in order (tests/sql/timebank_lane_test.sql checks it),
-- with one difference: in a batch where the pass leaves commands to exec,
-- the movements it decided get their numbers (ids, event sequence) before
-- those. Each account still sees its commands in order.

-- A run of lane movements, the first at position p_first of the batch: one
-- row each, i its position. Commands the pass does not decide itself (any
-- input timebank.exec would refuse, a key seen before or twice in the run,
-- a gift policy other than "anyone" or "community", an amount near the
-- bigint range) get a row with a NULL code, for the caller to run through
-- timebank.exec after this statement; so does every later command of the
-- run that touches an account of such a command, so that each account
-- still sees its commands in order.
CREATE FUNCTION timebank.s_move_lane(p_first integer, p_key text[], p_now bigint[],
                                     p_trace text[], p_name text[], p_from bigint[],
                                     p_to bigint[], p_pool bigint[], p_minutes bigint[],
                                     p_service text[], p_memo text[])
RETURNS TABLE (i integer, code text, message text, result text)
LANGUAGE plpgsql
-- One plan for every batch, and one that probes the indexes even when it
-- was made while the tables were empty: a cached plan outlives the
-- statistics it was made from (a scan of command_log per command, planned
-- on an empty table, would grow with every key ever stored).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_n      integer := coalesce(cardinality(p_key), 0);
    -- per command: its accounts (payer, payee, the two clearing accounts
    -- when it crosses communities), communities, whether the pass may
    -- decide it, the payer's minimum to hold before spending
    c_fa     bigint[];
    c_ta     bigint[];
    c_cf     bigint[];
    c_ct     bigint[];
    c_fc     bigint[];
    c_tc     bigint[];
    c_tp     bigint[];
    c_ok     boolean[];
    c_held   bigint[];
    c_fi     integer[];
    c_ti     integer[];
    c_cfi    integer[];
    c_cti    integer[];
    -- the accounts of the run, by id: balance now, at the start, lowest
    -- allowed (NULL: none), tainted by a command left to timebank.exec
    v_acc    bigint[];
    v_bal    bigint[];
    v_bal0   bigint[];
    v_lim    bigint[];
    v_taint  boolean[];
    -- per command: the outcome
    o_code   text[] := array_fill(NULL::text, ARRAY[v_n]);
    o_msg    text[] := array_fill(NULL::text, ARRAY[v_n]);
    o_t      integer[] := array_fill(0, ARRAY[v_n]);
    -- per movement posted: its command and balances after
    t_cmd    integer[] := '{}';
    t_fb     bigint[] := '{}';
    t_tb     bigint[] := '{}';
    t_id     bigint[];
    -- per entry: movement (1-based), account, amount, balance after
    e_t      integer[] := '{}';
    e_acc    bigint[] := '{}';
    e_amt    bigint[] := '{}';
    e_bal    bigint[] := '{}';
    k        integer;
    m        bigint;
    fi       integer;
    ti       integer;
    cfi      integer;
    cti      integer;
    v_turn   bigint;
    v_nt     integer := 0;
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    -- what each command names, one index probe per lookup
    SELECT array_agg(fa.id ORDER BY u.ord), array_agg(coalesce(tp.id, tq.id) ORDER BY u.ord),
           array_agg(cf.id ORDER BY u.ord), array_agg(ct.id ORDER BY u.ord),
           array_agg(fa.community_id ORDER BY u.ord),
           array_agg(coalesce(tp.community_id, tq.community_id) ORDER BY u.ord),
           array_agg(coalesce(tp.person_id, 0) ORDER BY u.ord),
           array_agg(fr.min_held_minutes::bigint ORDER BY u.ord),
           array_agg(coalesce(
               u.name IN ('gift', 'spend') AND u.pfrom > 0 AND u.pto >= 0 AND u.pool >= 0
               AND u.minutes BETWEEN 1 AND 60000000 AND u.now IS NOT NULL
               AND octet_length(u.key) <= 256 AND octet_length(u.memo) <= 200
               AND (u.key = '' OR u.key <> ALL (v_dupkeys.keys))
               AND fa.id IS NOT NULL AND coalesce(tp.id, tq.id) IS NOT NULL
               AND fa.id <> coalesce(tp.id, tq.id)
               AND (fa.community_id = coalesce(tp.community_id, tq.community_id)
                    OR (cf.id IS NOT NULL AND ct.id IS NOT NULL))
               AND CASE u.name
                   WHEN 'gift' THEN u.pto > 0 AND u.pool = 0
                        AND (fr.gift_policy = 'anyone'
                             OR (fr.gift_policy = 'community' AND fa.community_id = tp.community_id))
                   ELSE octet_length(u.service) BETWEEN 1 AND 64 AND (u.pto = 0 OR u.pool = 0)
                   END
               AND (u.key = '' OR (SELECT true FROM timebank.command_log l
                                    WHERE l.key = u.key) IS NULL),
               false) ORDER BY u.ord)
      INTO c_fa, c_ta, c_cf, c_ct, c_fc, c_tc, c_tp, c_held, c_ok
      FROM unnest(p_key, p_now, p_name, p_from, p_to, p_pool, p_minutes, p_service, p_memo)
           WITH ORDINALITY AS u (key, now, name, pfrom, pto, pool, minutes, service, memo, ord)
     CROSS JOIN (SELECT coalesce(array_agg(x), '{}') AS keys
                   FROM (SELECT x FROM unnest(p_key) x WHERE x <> ''
                          GROUP BY x HAVING count(*) > 1) d) v_dupkeys
      LEFT JOIN timebank.accounts fa ON fa.person_id = u.pfrom AND fa.kind = 'person'
      LEFT JOIN timebank.rules fr ON fr.community_id = fa.community_id
      LEFT JOIN timebank.accounts tp ON u.pto > 0 AND tp.person_id = u.pto AND tp.kind = 'person'
      LEFT JOIN timebank.accounts tq ON u.pto = 0 AND tq.kind = 'pool'
            AND tq.community_id = CASE WHEN u.pool = 0 THEN fa.community_id ELSE u.pool END
      LEFT JOIN timebank.accounts cf ON cf.kind = 'clearing' AND cf.community_id = fa.community_id
            AND fa.community_id <> coalesce(tp.community_id, tq.community_id)
      LEFT JOIN timebank.accounts ct ON ct.kind = 'clearing'
            AND ct.community_id = coalesce(tp.community_id, tq.community_id)
            AND fa.community_id <> coalesce(tp.community_id, tq.community_id);

    -- every account of the run, locked in id order (as timebank.s_post
    -- locks them, so the two never deadlock), with its balance under the
    -- lock and its community's overdraft; rules are read FOR SHARE so that
    -- a rule change waits for the run, as for every other movement
    SELECT array_agg(x.id ORDER BY x.id), array_agg(x.balance ORDER BY x.id),
           array_agg(x.lim ORDER BY x.id)
      INTO v_acc, v_bal, v_lim
      FROM (SELECT a.id, a.balance,
                   CASE WHEN a.kind = 'person' THEN -r.overdraft_minutes::bigint END AS lim
              FROM timebank.accounts a
              JOIN timebank.rules r ON r.community_id = a.community_id
             WHERE a.id = ANY (c_fa || c_ta || c_cf || c_ct)
             ORDER BY a.id
               FOR NO KEY UPDATE OF a FOR SHARE OF r) x;
    v_acc := coalesce(v_acc, '{}');
    v_bal0 := v_bal;
    v_taint := array_fill(false, ARRAY[greatest(cardinality(v_acc), 1)]);
    -- each command's accounts as positions in v_acc
    SELECT array_agg(a1.pos::integer ORDER BY u.ord), array_agg(a2.pos::integer ORDER BY u.ord),
           array_agg(a3.pos::integer ORDER BY u.ord), array_agg(a4.pos::integer ORDER BY u.ord)
      INTO c_fi, c_ti, c_cfi, c_cti
      FROM unnest(c_fa, c_ta, c_cf, c_ct) WITH ORDINALITY AS u (fa, ta, cf, ct, ord)
      LEFT JOIN unnest(v_acc) WITH ORDINALITY AS a1 (id, pos) ON a1.id = u.fa
      LEFT JOIN unnest(v_acc) WITH ORDINALITY AS a2 (id, pos) ON a2.id = u.ta
      LEFT JOIN unnest(v_acc) WITH ORDINALITY AS a3 (id, pos) ON a3.id = u.cf
      LEFT JOIN unnest(v_acc) WITH ORDINALITY AS a4 (id, pos) ON a4.id = u.ct;

    -- the pass, in command order
    FOR k IN 1 .. v_n LOOP
        fi := c_fi[k];
        ti := c_ti[k];
        cfi := c_cfi[k];
        cti := c_cti[k];
        m := p_minutes[k];
        IF NOT c_ok[k] OR fi IS NULL OR ti IS NULL
           OR v_taint[fi] OR v_taint[ti]
           OR (cfi IS NOT NULL AND (v_taint[cfi] OR v_taint[cti]))
           OR v_bal[ti] > 4000000000000000000 - m OR v_bal[fi] < -4000000000000000000 + m
           OR (cfi IS NOT NULL AND (v_bal[cfi] > 4000000000000000000 - m
                                    OR v_bal[cti] < -4000000000000000000 + m)) THEN
            -- left to timebank.exec: nothing after it may pass it by
            IF fi IS NOT NULL THEN v_taint[fi] := true; END IF;
            IF ti IS NOT NULL THEN v_taint[ti] := true; END IF;
            IF cfi IS NOT NULL THEN v_taint[cfi] := true; END IF;
            IF cti IS NOT NULL THEN v_taint[cti] := true; END IF;
            CONTINUE;
        END IF;
        IF v_lim[fi] IS NOT NULL AND v_bal[fi] - m < v_lim[fi] THEN
            o_code[k] := 'insufficient_balance';
            o_msg[k] := CASE p_name[k] WHEN 'gift'
                            THEN 'The gift would take the account below its limit.'
                            ELSE 'The spend would take the account below its limit.' END;
            CONTINUE;
        END IF;
        IF p_name[k] = 'spend' AND c_held[k] > 0 AND v_bal[fi] < c_held[k] THEN
            o_code[k] := 'below_min_held';
            o_msg[k] := format('This community lets members spend once they hold %s minutes.',
                               c_held[k]);
            CONTINUE;
        END IF;
        v_nt := v_nt + 1;
        v_bal[fi] := v_bal[fi] - m;
        e_t := e_t || v_nt;
        e_acc := e_acc || v_acc[fi];
        e_amt := e_amt || -m;
        e_bal := e_bal || v_bal[fi];
        IF cfi IS NOT NULL THEN
            v_bal[cfi] := v_bal[cfi] + m;
            v_bal[cti] := v_bal[cti] - m;
            e_t := e_t || v_nt || v_nt;
            e_acc := e_acc || v_acc[cfi] || v_acc[cti];
            e_amt := e_amt || m || -m;
            e_bal := e_bal || v_bal[cfi] || v_bal[cti];
        END IF;
        v_bal[ti] := v_bal[ti] + m;
        e_t := e_t || v_nt;
        e_acc := e_acc || v_acc[ti];
        e_amt := e_amt || m;
        e_bal := e_bal || v_bal[ti];
        o_code[k] := 'ok';
        o_msg[k] := '';
        o_t[k] := v_nt;
        t_cmd := t_cmd || k;
        t_fb := t_fb || v_bal[fi];
        t_tb := t_tb || v_bal[ti];
    END LOOP;

    IF v_nt > 0 THEN
        t_id := ARRAY(SELECT nextval('timebank.transfers_id_seq') FROM generate_series(1, v_nt));
        INSERT INTO timebank.transfers (id, kind, at, minutes, from_account, to_account, actor_id,
                                        memo, command_key)
        OVERRIDING SYSTEM VALUE
        SELECT t_id[x.t], p_name[x.k], p_now[x.k], p_minutes[x.k], c_fa[x.k], c_ta[x.k],
               p_from[x.k],
               CASE WHEN p_name[x.k] = 'gift' THEN p_memo[x.k]
                    WHEN p_memo[x.k] = '' THEN p_service[x.k]
                    ELSE p_service[x.k] || ': ' || p_memo[x.k] END,
               nullif(p_key[x.k], '')
          FROM unnest(t_cmd) WITH ORDINALITY AS x (k, t);
        INSERT INTO timebank.entries (transfer_id, account_id, amount, balance, at)
        SELECT t_id[x.t], x.acc, x.amt, x.bal, p_now[t_cmd[x.t]]
          FROM unnest(e_t, e_acc, e_amt, e_bal) AS x (t, acc, amt, bal);
        UPDATE timebank.accounts a SET balance = x.bal
          FROM unnest(v_acc, v_bal, v_bal0) AS x (id, bal, bal0)
         WHERE a.id = x.id AND x.bal <> x.bal0;
        -- the stream's write turn, late: see timebank.exec_batch
        v_turn := timebank.s_outbox_turn();
        INSERT INTO timebank.outbox (seq, type, community_id, trace_id, occurred_at, payload)
        SELECT v_turn + x.t, CASE p_name[x.k] WHEN 'gift' THEN 'gifted' ELSE 'spent' END,
               c_fc[x.k], coalesce(p_trace[x.k], ''), p_now[x.k],
               ('{"transfer_id": ' || t_id[x.t] || ', "kind": "' || p_name[x.k]
                || '", "from_account_id": ' || c_fa[x.k] || ', "to_account_id": ' || c_ta[x.k]
                || ', "from_person_id": ' || p_from[x.k] || ', "to_person_id": ' || c_tp[x.k]
                || ', "from_community_id": ' || c_fc[x.k]
                || ', "to_community_id": ' || c_tc[x.k] || ', "minutes": ' || p_minutes[x.k]
                || ', "record_id": 0, "reverses_id": 0, "at": ' || p_now[x.k] || '}')::json
          FROM unnest(t_cmd) WITH ORDINALITY AS x (k, t);
    END IF;

    RETURN QUERY
    WITH r AS (
        SELECT (p_first + x.k - 1)::integer AS i, x.k, o_code[x.k] AS code,
               o_msg[x.k] AS message,
               CASE WHEN o_code[x.k] = 'ok' THEN
                        '{"transfer_id": ' || t_id[o_t[x.k]] || ', "kind": "' || p_name[x.k]
                        || '", "from_account_id": ' || c_fa[x.k]
                        || ', "to_account_id": ' || c_ta[x.k]
                        || ', "from_balance": ' || t_fb[o_t[x.k]]
                        || ', "to_balance": ' || t_tb[o_t[x.k]]
                        || ', "minutes": ' || p_minutes[x.k] || '}'
                    WHEN o_code[x.k] IS NOT NULL THEN '{}'
               END AS result
          FROM generate_series(1, v_n) AS x (k)
    ), logged AS (
        INSERT INTO timebank.command_log (key, command, code, message, result)
        SELECT p_key[r.k], p_name[r.k], r.code, r.message, r.result::json
          FROM r WHERE r.code IS NOT NULL AND p_key[r.k] <> ''
    )
    SELECT r.i, r.code, r.message, r.result FROM r;
END
$$;

-- Runs the batch in order (common/sqlcmd.h): each JSON command through
-- timebank.exec, each run of lane movements through timebank.s_move_lane
-- and then, one by one, the commands it left. Returns one row per command,
-- i its 0-based position in p_cmds, in no particular order. Its plans (and
-- those of everything it calls) use the indexes whatever the statistics
-- said when the session made them: the daemon's sessions live long, and
-- the tables start empty.
CREATE FUNCTION timebank.exec_batch(p_cmds jsonb,
                                    p_key text[] DEFAULT '{}', p_now bigint[] DEFAULT '{}',
                                    p_trace text[] DEFAULT '{}', p_source text[] DEFAULT '{}',
                                    p_name text[] DEFAULT '{}', p_from bigint[] DEFAULT '{}',
                                    p_to bigint[] DEFAULT '{}', p_pool bigint[] DEFAULT '{}',
                                    p_minutes bigint[] DEFAULT '{}',
                                    p_service text[] DEFAULT '{}', p_memo text[] DEFAULT '{}')
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
    r       timebank.cmd_result;
    v_slow  integer[];
    v_fi    integer[];
    v_fc    text[];
    v_fm    text[];
    v_fr    text[];
BEGIN
    IF jsonb_typeof(p_cmds) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'timebank.exec_batch takes a JSON array' USING ERRCODE = '22023';
    END IF;
    IF v_rows <> coalesce(cardinality(p_now), 0) OR v_rows <> coalesce(cardinality(p_trace), 0)
       OR v_rows <> coalesce(cardinality(p_source), 0)
       OR v_rows <> coalesce(cardinality(p_name), 0)
       OR v_rows <> coalesce(cardinality(p_from), 0)
       OR v_rows <> coalesce(cardinality(p_to), 0)
       OR v_rows <> coalesce(cardinality(p_pool), 0)
       OR v_rows <> coalesce(cardinality(p_minutes), 0)
       OR v_rows <> coalesce(cardinality(p_service), 0)
       OR v_rows <> coalesce(cardinality(p_memo), 0) THEN
        RAISE EXCEPTION 'timebank.exec_batch: lane columns differ in length' USING ERRCODE = '22023';
    END IF;
    v_n := jsonb_array_length(p_cmds);
    -- The stream's write turn first, before any command locks a row of its
    -- own, so that writers take their locks in one order. A batch of lane
    -- movements only takes it late, after locking its accounts (in id
    -- order) and deciding, so that two such batches on different accounts
    -- (the daemon runs two at once) do that work at the same time; they
    -- cannot deadlock, as each holds every account lock it needs (its
    -- fallbacks' included) before it waits for the turn. The daemon never
    -- runs a batch with a JSON command beside another: two timebanks on one
    -- database could deadlock that way, and PostgreSQL would abort one
    -- batch, which its daemon reruns one command at a time.
    IF v_rows < v_n THEN
        PERFORM timebank.s_outbox_turn();
    END IF;
    WHILE v_i < v_n LOOP
        c := p_cmds -> v_i;
        IF jsonb_typeof(c) <> 'null' THEN
            r := timebank.exec(c ->> 'n', c ->> 'k', c -> 'a', c -> 'c');
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
            RAISE EXCEPTION 'timebank.exec_batch: more lane commands than lane rows'
                USING ERRCODE = '22023';
        END IF;
        SELECT array_agg(x.i ORDER BY x.i) FILTER (WHERE x.code IS NULL),
               array_agg(x.i) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.code) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.message) FILTER (WHERE x.code IS NOT NULL),
               array_agg(x.result) FILTER (WHERE x.code IS NOT NULL)
          INTO v_slow, v_fi, v_fc, v_fm, v_fr
          FROM timebank.s_move_lane(v_i,
                   p_key[v_f + 1 : v_f + v_j - v_i], p_now[v_f + 1 : v_f + v_j - v_i],
                   p_trace[v_f + 1 : v_f + v_j - v_i], p_name[v_f + 1 : v_f + v_j - v_i],
                   p_from[v_f + 1 : v_f + v_j - v_i], p_to[v_f + 1 : v_f + v_j - v_i],
                   p_pool[v_f + 1 : v_f + v_j - v_i], p_minutes[v_f + 1 : v_f + v_j - v_i],
                   p_service[v_f + 1 : v_f + v_j - v_i], p_memo[v_f + 1 : v_f + v_j - v_i]) x;
        RETURN QUERY SELECT * FROM unnest(v_fi, v_fc, v_fm, v_fr);
        FOREACH v_k IN ARRAY coalesce(v_slow, '{}') LOOP
            -- the arguments and ctx the daemon would have sent as JSON
            v_r := v_f + (v_k - v_i) + 1;
            r := timebank.exec(p_name[v_r], p_key[v_r],
                     CASE WHEN p_name[v_r] = 'gift' THEN
                              jsonb_build_object('from_person_id', p_from[v_r],
                                  'to_person_id', p_to[v_r], 'minutes', p_minutes[v_r],
                                  'memo', p_memo[v_r])
                          ELSE
                              jsonb_build_object('person_id', p_from[v_r],
                                  'provider_id', p_to[v_r], 'community_id', p_pool[v_r],
                                  'minutes', p_minutes[v_r], 'service', p_service[v_r],
                                  'memo', p_memo[v_r])
                     END,
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
        RAISE EXCEPTION 'timebank.exec_batch: more lane rows than lane commands'
            USING ERRCODE = '22023';
    END IF;
END
$$;
