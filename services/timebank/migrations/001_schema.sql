-- Timebank schema: what the timebank knows of communities, people and
-- activities (learned from registry events), accounts, the double-entry
-- ledger, hour records, community rules and their log, family links,
-- certificates, the idempotency log and the transactional outbox. Applied by
-- the C migrator inside one transaction into schema `timebank`.
--
-- Conventions as in the registry: ids are bigint, business times are bigint
-- milliseconds since the Unix epoch from the command's ctx.now, amounts are
-- whole minutes in bigint.
--
-- The ledger is append-only. A movement is one row of transfers and two (or,
-- between communities, four) rows of entries whose amounts sum to zero. No
-- row of transfers, entries, record_log or rule_log is ever updated or
-- deleted (triggers refuse it); a correction is a new transfer of kind
-- 'reversal' pointing at the one it undoes. accounts.balance is the sum of
-- the account's entries, kept in the same transaction under the account's
-- row lock; entries.balance is that sum just after the entry, which makes a
-- statement's running balance a read, not a computation.

CREATE TYPE timebank.cmd_result AS (code text, message text, result jsonb);

-- ------------------------------------------------ learned from the registry

-- Position of the last applied event per stream, written in the same
-- transaction as what the event changed.
CREATE TABLE timebank.inbox (
    stream  text   PRIMARY KEY,
    epoch   bigint NOT NULL,
    seq     bigint NOT NULL
);

CREATE TABLE timebank.communities (
    id          bigint PRIMARY KEY,
    name        text   NOT NULL,
    district    text   NOT NULL DEFAULT '',
    created_at  bigint NOT NULL
);

CREATE TABLE timebank.people (
    id            bigint  PRIMARY KEY,
    community_id  bigint  NOT NULL REFERENCES timebank.communities (id),
    volunteer     boolean NOT NULL,
    organiser     boolean NOT NULL,
    created_at    bigint  NOT NULL
);
CREATE INDEX people_community_idx ON timebank.people (community_id);

CREATE TABLE timebank.activities (
    id            bigint PRIMARY KEY,
    community_id  bigint NOT NULL REFERENCES timebank.communities (id),
    title         text   NOT NULL,
    starts_at     bigint NOT NULL,
    ends_at       bigint NOT NULL
);

-- Volunteers checked in to an activity and not yet out: the check-out turns
-- the stay into a proposed hour record.
CREATE TABLE timebank.open_stays (
    checkin_id   bigint PRIMARY KEY,
    person_id    bigint NOT NULL,
    activity_id  bigint NOT NULL,
    at           bigint NOT NULL
);

-- ------------------------------------------------------------ rules

CREATE TABLE timebank.rules (
    community_id        bigint    PRIMARY KEY REFERENCES timebank.communities (id),
    overdraft_minutes   integer   NOT NULL DEFAULT 0,
    max_record_minutes  integer   NOT NULL DEFAULT 720,
    max_day_minutes     integer   NOT NULL DEFAULT 960,
    min_held_minutes    integer   NOT NULL DEFAULT 0,
    gift_policy         text      NOT NULL DEFAULT 'anyone',
    approval_levels     smallint  NOT NULL DEFAULT 1,
    star_hours          integer[] NOT NULL DEFAULT '{100,300,600,1000,1500}',
    timezone            text      NOT NULL DEFAULT 'Asia/Shanghai',
    changed_at          bigint    NOT NULL,
    changed_by          bigint    NOT NULL DEFAULT 0,
    CONSTRAINT rules_overdraft CHECK (overdraft_minutes BETWEEN 0 AND 600000),
    CONSTRAINT rules_max_record CHECK (max_record_minutes BETWEEN 1 AND 1440),
    CONSTRAINT rules_max_day CHECK (max_day_minutes BETWEEN 1 AND 1440),
    CONSTRAINT rules_min_held CHECK (min_held_minutes BETWEEN 0 AND 6000000),
    CONSTRAINT rules_gift_policy CHECK (gift_policy IN ('anyone', 'community', 'family', 'none')),
    CONSTRAINT rules_levels CHECK (approval_levels IN (1, 2)),
    CONSTRAINT rules_stars CHECK (cardinality(star_hours) <= 10)
);

-- Every change of a community's rules: who, when, why, before and after.
CREATE TABLE timebank.rule_log (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    community_id  bigint NOT NULL,
    actor_id      bigint NOT NULL,
    at            bigint NOT NULL,
    reason        text   NOT NULL,
    old_rules     jsonb,
    new_rules     jsonb  NOT NULL
);
CREATE INDEX rule_log_community_idx ON timebank.rule_log (community_id, id);

-- Who may receive a person's gifts under the "family" policy; one row per
-- direction.
CREATE TABLE timebank.family (
    person_id    bigint NOT NULL,
    relative_id  bigint NOT NULL,
    relation     text   NOT NULL,
    created_by   bigint NOT NULL,
    created_at   bigint NOT NULL,
    PRIMARY KEY (person_id, relative_id),
    CONSTRAINT family_not_self CHECK (person_id <> relative_id)
);

-- ------------------------------------------------------------ ledger

-- One account per person; per community a pool (the community's time bank,
-- which pays credited hours and receives spends; it may go below zero: it
-- issues hours) and a clearing account (the community's position towards
-- other communities when hours cross between them).
CREATE TABLE timebank.accounts (
    id            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text    NOT NULL,
    person_id     bigint,
    community_id  bigint  NOT NULL,
    balance       bigint  NOT NULL DEFAULT 0,
    earned        bigint  NOT NULL DEFAULT 0,   -- credited minutes net of reversals
    stars         smallint NOT NULL DEFAULT 0,
    created_at    bigint  NOT NULL,
    CONSTRAINT accounts_kind CHECK (kind IN ('person', 'pool', 'clearing')),
    CONSTRAINT accounts_person CHECK ((kind = 'person') = (person_id IS NOT NULL))
) WITH (fillfactor = 50);   -- room on each page, so a new balance is a HOT update
CREATE UNIQUE INDEX accounts_person_key ON timebank.accounts (person_id) WHERE kind = 'person';
CREATE UNIQUE INDEX accounts_system_key ON timebank.accounts (community_id, kind)
    WHERE kind <> 'person';

CREATE TABLE timebank.transfers (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text   NOT NULL,
    at            bigint NOT NULL,
    minutes       bigint NOT NULL,
    from_account  bigint NOT NULL,
    to_account    bigint NOT NULL,
    actor_id      bigint NOT NULL DEFAULT 0,
    record_id     bigint,
    reverses_id   bigint REFERENCES timebank.transfers (id),
    memo          text   NOT NULL DEFAULT '',
    command_key   text,              -- idempotency key of the command that made it
    CONSTRAINT transfers_kind CHECK (kind IN ('credit', 'gift', 'spend', 'reversal')),
    CONSTRAINT transfers_minutes CHECK (minutes > 0),
    CONSTRAINT transfers_two_sides CHECK (from_account <> to_account),
    CONSTRAINT transfers_reversal CHECK ((kind = 'reversal') = (reverses_id IS NOT NULL)),
    CONSTRAINT transfers_memo_len CHECK (octet_length(memo) <= 600)
);
-- a movement is reversed at most once
CREATE UNIQUE INDEX transfers_reverses_key ON timebank.transfers (reverses_id)
    WHERE reverses_id IS NOT NULL;
CREATE UNIQUE INDEX transfers_key ON timebank.transfers (command_key)
    WHERE command_key IS NOT NULL;
CREATE UNIQUE INDEX transfers_record_key ON timebank.transfers (record_id)
    WHERE kind = 'credit';

-- Keyed by account, then ledger order: the one index a statement reads (an
-- account's entries in order) and the only one each entry costs to write.
-- Nothing looks entries up by movement on the write path (a reversal's legs
-- follow from the movement's two accounts).
CREATE TABLE timebank.entries (
    id           bigint GENERATED ALWAYS AS IDENTITY,
    transfer_id  bigint NOT NULL,
    account_id   bigint NOT NULL,
    amount       bigint NOT NULL,
    balance      bigint NOT NULL,    -- the account's balance just after this entry
    at           bigint NOT NULL,
    PRIMARY KEY (account_id, id),
    CONSTRAINT entries_amount CHECK (amount <> 0)
);

-- ------------------------------------------------------------ hour records

CREATE TABLE timebank.records (
    id            bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id     bigint   NOT NULL,
    community_id  bigint   NOT NULL,
    activity_id   bigint   NOT NULL DEFAULT 0,
    minutes       integer  NOT NULL,
    started_at    bigint   NOT NULL,
    day           date     NOT NULL,   -- of started_at, in the community's time zone
    field         text     NOT NULL DEFAULT '',
    content       text     NOT NULL DEFAULT '',
    state         text     NOT NULL DEFAULT 'pending',
    source        text     NOT NULL,
    checkin_id    bigint,
    needs_review  boolean  NOT NULL DEFAULT false,
    reason        text     NOT NULL DEFAULT '',   -- why declined, or why it needs review
    levels        smallint NOT NULL,
    approvals     smallint NOT NULL DEFAULT 0,
    transfer_id   bigint,
    created_by    bigint   NOT NULL,
    created_at    bigint   NOT NULL,
    CONSTRAINT records_minutes CHECK (minutes > 0),
    CONSTRAINT records_state CHECK (state IN ('pending', 'approved', 'credited', 'declined',
                                              'reversed')),
    CONSTRAINT records_source CHECK (source IN ('manual', 'checkin')),
    CONSTRAINT records_field_len CHECK (octet_length(field) <= 64),
    CONSTRAINT records_content_len CHECK (octet_length(content) <= 500)
) WITH (fillfactor = 80);   -- a record's state changes a few times
CREATE UNIQUE INDEX records_checkin_key ON timebank.records (checkin_id)
    WHERE checkin_id IS NOT NULL;
CREATE INDEX records_person_day_idx ON timebank.records (person_id, day);
CREATE INDEX records_community_state_idx ON timebank.records (community_id, state, id);

-- Every step of every record: recorded, approved (per level), credited,
-- declined, reversed; with who and why.
CREATE TABLE timebank.record_log (
    id         bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record_id  bigint   NOT NULL,
    at         bigint   NOT NULL,
    actor_id   bigint   NOT NULL,
    state      text     NOT NULL,
    level      smallint NOT NULL DEFAULT 0,
    reason     text     NOT NULL DEFAULT ''
);
CREATE INDEX record_log_record_idx ON timebank.record_log (record_id);

-- ------------------------------------------------------------ certificates

CREATE SEQUENCE timebank.certificate_seq;

CREATE TABLE timebank.certificates (
    number            text   PRIMARY KEY,
    person_id         bigint NOT NULL,
    community_id      bigint NOT NULL,
    issuer            text   NOT NULL,
    holder_name       text   NOT NULL,
    id_number_masked  text   NOT NULL,
    issued_by         bigint NOT NULL,
    issued_at         bigint NOT NULL,
    period_from       bigint NOT NULL,
    period_to         bigint NOT NULL,
    total_minutes     bigint NOT NULL,
    periods           jsonb  NOT NULL,
    movements         bigint[] NOT NULL,  -- the credit transfers it covers
    digest            text   NOT NULL
);

-- ------------------------------------------------------------ append-only

CREATE FUNCTION timebank.s_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'timebank.%: rows are never changed or deleted; post a reversal instead',
        TG_TABLE_NAME USING ERRCODE = '55000';
END
$$;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON timebank.transfers
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON timebank.entries
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER record_log_append_only BEFORE UPDATE OR DELETE ON timebank.record_log
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER rule_log_append_only BEFORE UPDATE OR DELETE ON timebank.rule_log
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER certificates_append_only BEFORE UPDATE OR DELETE ON timebank.certificates
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON timebank.transfers
    FOR EACH STATEMENT EXECUTE FUNCTION timebank.s_append_only();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON timebank.entries
    FOR EACH STATEMENT EXECUTE FUNCTION timebank.s_append_only();

-- Records are never deleted (their state changes, logged in record_log).
CREATE TRIGGER records_no_delete BEFORE DELETE ON timebank.records
    FOR EACH ROW EXECUTE FUNCTION timebank.s_append_only();

-- Every statement that writes entries leaves each transfer it touched
-- balanced: one check per statement, over the rows it inserted.
CREATE FUNCTION timebank.s_entries_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    SELECT transfer_id INTO v FROM new_entries GROUP BY transfer_id HAVING sum(amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'timebank.entries: transfer % does not balance', v USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER entries_balanced AFTER INSERT ON timebank.entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION timebank.s_entries_balanced();

-- ------------------------------------------------------------ delivery

-- The first reply to every command sent with an idempotency key; as json
-- text, which is written often and read back only for a retry.
CREATE TABLE timebank.command_log (
    key         text        PRIMARY KEY,
    command     text        NOT NULL,
    code        text        NOT NULL,
    message     text        NOT NULL,
    result      json        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The outbox, numbered under the stream row's lock as in the registry
-- (services/registry/migrations/001_schema.sql says why).
CREATE TABLE timebank.outbox (
    stream        text        NOT NULL DEFAULT 'timebank',
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    community_id  bigint      NOT NULL DEFAULT 0,
    trace_id      text        NOT NULL DEFAULT '',
    occurred_at   bigint      NOT NULL,
    payload       json        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, seq)
);

CREATE TABLE timebank.outbox_stream (
    stream  text   PRIMARY KEY,
    epoch   bigint NOT NULL
);
INSERT INTO timebank.outbox_stream (stream, epoch)
VALUES ('timebank', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

CREATE FUNCTION timebank.s_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('timebank_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON timebank.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION timebank.s_outbox_notify();
