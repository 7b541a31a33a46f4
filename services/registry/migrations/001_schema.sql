-- Registry schema: communities, people, activities, sign-ups with waiting
-- lists and offers, check-ins, scans, stamp routes, the idempotency log and
-- the transactional outbox. Applied by the C migrator inside one transaction,
-- into schema `registry`, which the migrator has already created.
--
-- Conventions: ids are bigint identities; business times are bigint
-- milliseconds since the Unix epoch taken from the command's ctx.now (never
-- now()), so tests and replays control time; sizes are checked in bytes.
-- Every table carries community_id so it can later be distributed by it.
--
-- Foreign keys are declared only on cold tables. The hot-path tables
-- (signups, wait_groups, offers, checkins, scans, stamps, outbox) have none:
-- nothing in this schema is ever deleted, the command functions look every
-- referenced row up before writing, and an RI check per inserted row would
-- cost a trigger call plus a KEY SHARE lock on a hot parent row (the one
-- activity everybody is checking in to), which under concurrent batches
-- turns into MultiXact churn.

CREATE TYPE registry.cmd_result AS (code text, message text, result jsonb);

-- ---------------------------------------------------------------- people

CREATE TABLE registry.communities (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text   NOT NULL,
    district    text   NOT NULL DEFAULT '',
    city        text   NOT NULL DEFAULT '',
    created_at  bigint NOT NULL,
    CONSTRAINT communities_name_len CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT communities_district_len CHECK (octet_length(district) <= 128),
    CONSTRAINT communities_city_len CHECK (octet_length(city) <= 128),
    CONSTRAINT communities_name_key UNIQUE (name)
);

CREATE TABLE registry.people (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    community_id  bigint NOT NULL REFERENCES registry.communities (id),
    name          text   NOT NULL,
    phone         text   NOT NULL DEFAULT '',  -- personal data: never in events or logs
    roles         text[] NOT NULL,
    language      text   NOT NULL DEFAULT '',
    created_at    bigint NOT NULL,
    CONSTRAINT people_name_len CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT people_phone_chars CHECK (phone ~ '^[0-9+ -]{0,32}$'),
    CONSTRAINT people_language_len CHECK (octet_length(language) <= 35),
    CONSTRAINT people_roles_valid CHECK (
        cardinality(roles) BETWEEN 1 AND 3
        AND roles <@ ARRAY['ROLE_RESIDENT', 'ROLE_VOLUNTEER', 'ROLE_ORGANISER'])
);
CREATE INDEX people_community_idx ON registry.people (community_id);

-- ------------------------------------------------------------ activities

CREATE TABLE registry.activities (
    id                 bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    community_id       bigint  NOT NULL REFERENCES registry.communities (id),
    title              text    NOT NULL,
    place              text    NOT NULL DEFAULT '',
    zone               text    NOT NULL DEFAULT '',
    starts_at          bigint  NOT NULL,
    ends_at            bigint  NOT NULL,
    capacity           integer NOT NULL,
    -- confirmed sign-ups plus seats held by open offers
    taken              integer NOT NULL DEFAULT 0,
    signup_opens_at    bigint  NOT NULL,
    signup_closes_at   bigint  NOT NULL,
    offer_ttl_seconds  integer NOT NULL,
    auto_checkout_at   bigint  NOT NULL,
    walk_in            boolean NOT NULL DEFAULT false,
    created_at         bigint  NOT NULL,
    CONSTRAINT activities_title_len CHECK (octet_length(title) BETWEEN 1 AND 200),
    CONSTRAINT activities_place_len CHECK (octet_length(place) <= 200),
    CONSTRAINT activities_zone_len CHECK (octet_length(zone) <= 64),
    CONSTRAINT activities_times CHECK (starts_at > 0 AND starts_at < ends_at),
    CONSTRAINT activities_capacity CHECK (capacity BETWEEN 1 AND 1000000),
    CONSTRAINT activities_taken CHECK (taken >= 0 AND taken <= capacity),
    CONSTRAINT activities_signup_window CHECK (signup_opens_at >= 0
                                               AND signup_opens_at < signup_closes_at),
    CONSTRAINT activities_offer_ttl CHECK (offer_ttl_seconds BETWEEN 1 AND 2592000),
    CONSTRAINT activities_auto_checkout CHECK (auto_checkout_at > starts_at)
);
CREATE INDEX activities_community_idx ON registry.activities (community_id);

-- One row per person per sign-up. Life cycle:
--   confirmed -> cancelled
--   waitlisted -> offered -> confirmed | declined | expired
--   waitlisted | offered -> cancelled
-- At most one active (waitlisted, offered or confirmed) row per person and
-- activity; the partial unique index enforces it and serves every lookup.
CREATE TABLE registry.signups (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    activity_id   bigint NOT NULL,
    person_id     bigint NOT NULL,
    community_id  bigint NOT NULL,
    group_id      bigint,          -- wait_groups.id when it went through the waiting list
    status        text   NOT NULL,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    CONSTRAINT signups_status CHECK (status IN ('confirmed', 'waitlisted', 'offered',
                                                'cancelled', 'declined', 'expired')),
    CONSTRAINT signups_group CHECK (status NOT IN ('waitlisted', 'offered') OR group_id IS NOT NULL)
);
CREATE UNIQUE INDEX signups_active_key ON registry.signups (activity_id, person_id)
    WHERE status IN ('confirmed', 'waitlisted', 'offered');
CREATE INDEX signups_group_idx ON registry.signups (group_id) WHERE group_id IS NOT NULL;

-- A household or group on the waiting list, first come first served (by id).
-- size counts its members still waiting or offered.
CREATE TABLE registry.wait_groups (
    id            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    activity_id   bigint  NOT NULL,
    community_id  bigint  NOT NULL,
    size          integer NOT NULL,
    status        text    NOT NULL DEFAULT 'waiting',
    created_at    bigint  NOT NULL,
    CONSTRAINT wait_groups_status CHECK (status IN ('waiting', 'offered', 'done', 'cancelled')),
    CONSTRAINT wait_groups_size CHECK (size BETWEEN 0 AND 20
                                       AND (size > 0 OR status IN ('done', 'cancelled')))
);
CREATE INDEX wait_groups_queue_idx ON registry.wait_groups (activity_id, id)
    WHERE status = 'waiting';

-- Seats offered to the group at the head of the waiting list. While open the
-- offer holds `seats` seats in activities.taken.
CREATE TABLE registry.offers (
    id               bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    activity_id      bigint  NOT NULL,
    community_id     bigint  NOT NULL,
    group_id         bigint  NOT NULL,
    first_person_id  bigint  NOT NULL,
    seats            integer NOT NULL,
    status           text    NOT NULL DEFAULT 'open',
    made_at          bigint  NOT NULL,
    expires_at       bigint  NOT NULL,
    closed_at        bigint,
    CONSTRAINT offers_status CHECK (status IN ('open', 'accepted', 'declined', 'expired')),
    CONSTRAINT offers_seats CHECK (seats BETWEEN 0 AND 20 AND (seats > 0 OR status <> 'open')),
    CONSTRAINT offers_closed CHECK ((status = 'open') = (closed_at IS NULL)),
    CONSTRAINT offers_times CHECK (expires_at > made_at)
);
CREATE INDEX offers_due_idx ON registry.offers (expires_at) WHERE status = 'open';
CREATE INDEX offers_open_idx ON registry.offers (activity_id) WHERE status = 'open';

-- ------------------------------------------------------------ stamp routes

CREATE TABLE registry.routes (
    id            bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    community_id  bigint   NOT NULL REFERENCES registry.communities (id),
    name          text     NOT NULL,
    reward        text     NOT NULL DEFAULT '',
    stations      smallint NOT NULL,  -- stamps needed to redeem
    created_at    bigint   NOT NULL,
    CONSTRAINT routes_name_len CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT routes_reward_len CHECK (octet_length(reward) <= 200),
    CONSTRAINT routes_stations CHECK (stations BETWEEN 1 AND 50)
);

CREATE TABLE registry.stations (
    id            bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route_id      bigint   NOT NULL REFERENCES registry.routes (id),
    community_id  bigint   NOT NULL,
    position      smallint NOT NULL,  -- 1-based walking order
    name          text     NOT NULL,
    CONSTRAINT stations_name_len CHECK (octet_length(name) BETWEEN 1 AND 128),
    CONSTRAINT stations_position_key UNIQUE (route_id, position)
);

-- One stamp per person per station; the key's prefix counts a person's stamps.
CREATE TABLE registry.stamps (
    route_id      bigint NOT NULL,
    person_id     bigint NOT NULL,
    station_id    bigint NOT NULL,
    community_id  bigint NOT NULL,
    checkin_id    bigint NOT NULL,
    collected_at  bigint NOT NULL,
    PRIMARY KEY (route_id, person_id, station_id)
);

CREATE TABLE registry.redemptions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route_id      bigint NOT NULL REFERENCES registry.routes (id),
    person_id     bigint NOT NULL REFERENCES registry.people (id),
    community_id  bigint NOT NULL,
    reward        text   NOT NULL,
    redeemed_at   bigint NOT NULL,
    CONSTRAINT redemptions_once UNIQUE (route_id, person_id)
);

-- ------------------------------------------------------------ check-ins

-- A presence at an activity (open until checked out) or a visit to a route
-- station (closed at once: checked_out_at = checked_in_at).
CREATE TABLE registry.checkins (
    id                bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    community_id      bigint  NOT NULL,
    activity_id       bigint,
    station_id        bigint,
    route_id          bigint,
    person_id         bigint  NOT NULL,
    device_id         text    NOT NULL DEFAULT '',
    checked_in_at     bigint  NOT NULL,
    checked_out_at    bigint,
    automatic         boolean NOT NULL DEFAULT false,
    -- copy of activities.auto_checkout_at (activities never change), so the
    -- sweep finds due check-ins through one small partial index
    auto_checkout_at  bigint,
    CONSTRAINT checkins_subject CHECK ((activity_id IS NULL) <> (station_id IS NULL)),
    CONSTRAINT checkins_station CHECK (station_id IS NULL
                                       OR (route_id IS NOT NULL AND checked_out_at IS NOT NULL)),
    CONSTRAINT checkins_times CHECK (checked_out_at >= checked_in_at)
);
CREATE UNIQUE INDEX checkins_open_key ON registry.checkins (activity_id, person_id)
    WHERE checked_out_at IS NULL;
-- The extra "auto_checkout_at IS NOT NULL" keeps this index from matching
-- the open-check-in lookup by (activity_id, person_id), which a plan made
-- from stale statistics could otherwise run through it.
CREATE INDEX checkins_due_idx ON registry.checkins (auto_checkout_at)
    WHERE checked_out_at IS NULL AND auto_checkout_at IS NOT NULL;

-- Every scan, accepted or refused, for statistics and for nonce replay:
-- (device_id, counter) is the scanner's nonce, and a repeated one gets the
-- reply rebuilt from this row (registry.s_scan_reply).
CREATE TABLE registry.scans (
    id            bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     text     NOT NULL,
    counter       bigint   NOT NULL,  -- uint64 stored two's-complement
    person_id     bigint   NOT NULL,
    kind          "char",             -- 'a' activity, 's' station; NULL when the token was unreadable
    subject_id    bigint   NOT NULL,
    community_id  bigint   NOT NULL,
    exit          boolean  NOT NULL,
    expected_id   bigint   NOT NULL,
    verdict       text     NOT NULL,
    scanned_at    bigint   NOT NULL,
    received_at   bigint   NOT NULL,
    accepted      boolean  NOT NULL,
    reason        text     NOT NULL,  -- '' when accepted
    checkin_id    bigint   NOT NULL,  -- 0 when refused
    stamps        smallint NOT NULL,
    stations      smallint NOT NULL,
    CONSTRAINT scans_device_len CHECK (octet_length(device_id) <= 64),
    CONSTRAINT scans_reason CHECK (accepted = (reason = ''))
);
CREATE UNIQUE INDEX scans_nonce_key ON registry.scans (device_id, counter) WHERE device_id <> '';

-- ------------------------------------------------------------ delivery

-- The first reply to every command sent with an idempotency key.
CREATE TABLE registry.command_log (
    key         text        PRIMARY KEY,
    command     text        NOT NULL,
    code        text        NOT NULL,
    message     text        NOT NULL,
    result      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Events written in the same transaction as the change they describe, each
-- numbered as it is written (registry.s_emit): the first event of a
-- transaction locks the stream row, so transactions that write events take
-- turns and commit in the order of their numbers. A reader therefore never
-- sees a number before the ones below it are visible, and the relay simply
-- publishes whatever is past the last number it sent. An event's id is not
-- stored: registry.outbox_replay derives it from (stream, epoch, seq), which
-- names the event for good and costs nothing on the write path.
CREATE TABLE registry.outbox (
    stream        text        NOT NULL DEFAULT 'registry',
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    community_id  bigint      NOT NULL DEFAULT 0,
    trace_id      text        NOT NULL DEFAULT '',
    occurred_at   bigint      NOT NULL,
    payload       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, seq)
);

-- One row per stream: its epoch (history restarts get a new one) and the
-- lock that orders writers.
CREATE TABLE registry.outbox_stream (
    stream  text   PRIMARY KEY,
    epoch   bigint NOT NULL
);
INSERT INTO registry.outbox_stream (stream, epoch)
VALUES ('registry', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

-- Wakes the relay (LISTEN registry_outbox). Per statement, not per row, and
-- notifications with the same payload fold into one per transaction.
CREATE FUNCTION registry.s_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('registry_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON registry.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION registry.s_outbox_notify();
