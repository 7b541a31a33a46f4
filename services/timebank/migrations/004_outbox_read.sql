-- The relay's read, without the event id.
--
-- timebank.outbox_replay derives each event's id as
-- md5(stream || ':' || epoch || ':' || seq)::uuid. Computing that hash for
-- every row cost the database more than the rest of the read, and the
-- database is what a flood of commands waits on; the relay and the replay
-- endpoint (common/outbox.c) now derive the same id from the same text
-- themselves. outbox_replay stays as the id's definition, for anyone reading
-- the table by hand.
CREATE FUNCTION timebank.outbox_read(p_stream text, p_after bigint, p_limit integer)
RETURNS TABLE (seq bigint, epoch bigint, type text, community_id bigint,
               trace_id text, occurred_at bigint, payload text)
LANGUAGE sql STABLE AS $$
    SELECT o.seq, s.epoch, o.type, o.community_id, o.trace_id, o.occurred_at, o.payload::text
      FROM timebank.outbox_stream s
      JOIN timebank.outbox o ON o.stream = s.stream
     WHERE s.stream = p_stream AND o.seq > p_after
     ORDER BY o.seq
     LIMIT greatest(p_limit, 0)
$$;
