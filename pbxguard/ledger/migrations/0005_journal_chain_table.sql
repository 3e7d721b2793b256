-- The hash chain in a table of its own, written once per decision.
--
-- 0003 kept each entry's seq and hashes in the decision's own row, so the sealer UPDATEd every
-- decision after its commit: a second version of a wide row, with an entry in each of its indexes
-- (an UPDATE of an indexed column is never HOT), and a dead version for the vacuum.  With the FastAGI
-- gate running 930 checks/s, sealing cost PostgreSQL about a fifth of its CPU per decision, and its
-- bursts of writes every 200 ms showed in the slowest answers.  An entry is now one narrow INSERT.
--
-- The sealer walks decisions in (xid, id) order from a mark kept with each checkpoint: every decision
-- at or below the mark is sealed.  It takes only decisions whose xid is below the snapshot's xmin,
-- whose transactions have all ended, so no decision can appear at or below the mark afterwards.
--
-- Decisions sealed under 0003 keep seq, prev_hash and entry_hash in their own row (never written
-- again) and their entries are copied into the chain table here; the sealer skips them (seq IS NOT
-- NULL) where they sit above the mark.

CREATE TABLE pbxguard.journal_chain (
    seq         bigint PRIMARY KEY,
    consumer    text   NOT NULL,
    id          uuid   NOT NULL,
    prev_hash   bytea  NOT NULL,
    entry_hash  bytea  NOT NULL,
    -- A decision is sealed once; exports and verification find its entry through this index.
    UNIQUE (consumer, id)
);

INSERT INTO pbxguard.journal_chain (seq, consumer, id, prev_hash, entry_hash)
SELECT seq, consumer, id, prev_hash, entry_hash FROM pbxguard.decisions WHERE seq IS NOT NULL;

ALTER TABLE pbxguard.journal_checkpoints
    ADD COLUMN mark_xid xid8,
    ADD COLUMN mark_id  uuid;

-- The first mark: just below the oldest decision 0003 left unsealed, else the newest decision.
CREATE FUNCTION pg_temp.first_mark() RETURNS xid8 LANGUAGE sql AS $$
    SELECT coalesce(
        (SELECT (min(xid)::text::numeric - 1)::text::xid8 FROM pbxguard.decisions WHERE seq IS NULL),
        (SELECT max(xid) FROM pbxguard.decisions),
        '0'::xid8)
$$;

UPDATE pbxguard.journal_checkpoints
   SET mark_xid = pg_temp.first_mark(), mark_id = 'ffffffff-ffff-ffff-ffff-ffffffffffff'
 WHERE seq = (SELECT max(seq) FROM pbxguard.journal_checkpoints);

INSERT INTO pbxguard.journal_checkpoints (seq, entry_hash, rows, mark_xid, mark_id)
SELECT 0, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea, 0,
       pg_temp.first_mark(), 'ffffffff-ffff-ffff-ffff-ffffffffffff'
 WHERE NOT EXISTS (SELECT 1 FROM pbxguard.journal_checkpoints);

-- What the sealer reads now, in place of the two partial indexes on seq that every decision fed.
DROP INDEX pbxguard.decisions_unsealed;
DROP INDEX pbxguard.decisions_seq;
CREATE INDEX decisions_xid ON pbxguard.decisions (xid, id);
