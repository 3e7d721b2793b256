-- The journal's hash chain.
--
-- Decisions are written by many transactions at once, so the chain is not computed in the decision
-- path (that would serialise every call of every consumer on one row).  A sealer links committed
-- rows in batches, in the order it seals them: `seq` numbers them without gaps, `prev_hash` is the
-- previous row's `entry_hash`, and `entry_hash` covers the decision's own fields.  A row is sealed
-- only once every transaction that could still commit an earlier row has finished (`xid` below the
-- snapshot's xmin), so no row can slip in behind the chain's head.

ALTER TABLE pbxguard.decisions
    ADD COLUMN xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ADD COLUMN seq         bigint,
    ADD COLUMN prev_hash   bytea,
    ADD COLUMN entry_hash  bytea;

CREATE INDEX decisions_seq ON pbxguard.decisions (seq) WHERE seq IS NOT NULL;
CREATE INDEX decisions_unsealed ON pbxguard.decisions (recorded_at, id) WHERE seq IS NULL;

-- The chain's head after each sealed batch: truncating the journal's tail contradicts it.
CREATE TABLE pbxguard.journal_checkpoints (
    seq         bigint PRIMARY KEY,
    entry_hash  bytea NOT NULL,
    rows        integer NOT NULL,
    sealed_at   timestamptz NOT NULL DEFAULT now()
);
