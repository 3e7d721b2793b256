-- The hash chain moves out of the decision rows into a table of its own.
--
-- Sealing used to UPDATE each decision: a new version of a wide row plus an entry in each of its
-- indexes (the chain columns were indexed, so the update could never be HOT), about as much WAL as
-- the decision itself, a dead row per decision for vacuum, and row locks on decisions that an
-- outcome being recorded had to wait for.  A link is now one narrow INSERT.
--
-- Which decisions still wait for the sealer: those above the horizon the last seal recorded (every
-- decision of a transaction below it was sealed) and not in the chain.  The horizon is a transaction
-- id of this cluster; one restored from another cluster's journal is above anything this cluster has
-- reached, and the sealer then reads from the start once.

-- Taken first: the chain columns are dropped below, and a lock taken weaker then raised would
-- deadlock with a decision that read the table before it wrote.  Calls wait for the copy.
LOCK TABLE pbxguard.decisions IN ACCESS EXCLUSIVE MODE;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pbxguard.decisions
                WHERE seq IS NOT NULL AND (prev_hash IS NULL OR entry_hash IS NULL))
       OR EXISTS (SELECT 1 FROM pbxguard.decisions WHERE seq IS NOT NULL GROUP BY seq HAVING count(*) > 1)
    THEN
        RAISE EXCEPTION 'the journal''s hash chain is damaged (a seq twice, or a hash missing): '
            'check it with `pbxguard audit verify` under the previous version before upgrading';
    END IF;
END
$$;

CREATE TABLE pbxguard.journal_chain (
    seq         bigint PRIMARY KEY CHECK (seq > 0),
    consumer    text NOT NULL,
    id          uuid NOT NULL,
    prev_hash   bytea NOT NULL,
    entry_hash  bytea NOT NULL,
    UNIQUE (consumer, id)
);

INSERT INTO pbxguard.journal_chain (seq, consumer, id, prev_hash, entry_hash)
SELECT seq, consumer, id, prev_hash, entry_hash FROM pbxguard.decisions WHERE seq IS NOT NULL;

-- sealed_below: every decision of this cluster's transactions below it is in the chain.
-- restored_below: so is every decision restored from another cluster's journal (transaction ids at
-- or above this cluster's counter) below it, which spares the sealer reading them all again.
ALTER TABLE pbxguard.journal_checkpoints ADD COLUMN sealed_below xid8, ADD COLUMN restored_below xid8;

-- Every committed decision below the lowest unsealed one is sealed; so is every one below the
-- snapshot's xmin if none is unsealed.
UPDATE pbxguard.journal_checkpoints
   SET sealed_below = (
       SELECT least(min(xid), pg_snapshot_xmin(pg_current_snapshot()))
         FROM pbxguard.decisions WHERE seq IS NULL
   )
 WHERE seq = (SELECT max(seq) FROM pbxguard.journal_checkpoints);

DROP INDEX pbxguard.decisions_seq;
DROP INDEX pbxguard.decisions_unsealed;
ALTER TABLE pbxguard.decisions DROP COLUMN seq, DROP COLUMN prev_hash, DROP COLUMN entry_hash;
CREATE INDEX decisions_xid ON pbxguard.decisions (xid);
