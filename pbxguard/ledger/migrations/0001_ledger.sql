-- pbxguard ledger: per-consumer facts, attempts and the decision journal.
--
-- Every per-consumer table carries the consumer's E.164 number as (part of) its key and the decide
-- function touches one consumer's rows only: distributed by `consumer` on Citus, with the
-- reference tables (order_givers, campaigns, caller_id_authorizations) replicated, the same
-- statement runs on the shard that holds the consumer.

CREATE TABLE pbxguard.order_givers (
    name        text PRIMARY KEY CHECK (name <> ''),
    siren       text CHECK (siren IS NULL OR siren ~ '^[0-9]{9}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pbxguard.campaigns (
    id           text PRIMARY KEY CHECK (id <> ''),
    order_giver  text NOT NULL REFERENCES pbxguard.order_givers (name),
    purpose      text NOT NULL CHECK (purpose IN
                   ('b2c_prospecting', 'b2b', 'contract_service', 'survey', 'non_commercial')),
    sector       text NOT NULL CHECK (sector IN
                   ('general', 'renovation_energetique', 'adaptation_logement', 'formation_cpf', 'press')),
    automated    boolean NOT NULL,
    prerecorded  boolean NOT NULL DEFAULT false,
    script_id    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pbxguard.caller_id_authorizations (
    id           bigserial PRIMARY KEY,
    caller_id    text NOT NULL,
    order_giver  text NOT NULL REFERENCES pbxguard.order_givers (name),
    valid_from   date NOT NULL,
    valid_until  date,
    proof        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until IS NULL OR valid_until >= valid_from)
);
CREATE INDEX caller_id_authorizations_lookup
    ON pbxguard.caller_id_authorizations (caller_id, order_giver);

-- What the CRM knows of where a consumer lives; adds to what the number shows.
CREATE TABLE pbxguard.consumers (
    consumer     text PRIMARY KEY,
    territory    text,
    departement  text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pbxguard.consents (
    consumer     text NOT NULL,
    id           bigserial,
    order_giver  text NOT NULL,
    given_at     timestamptz NOT NULL,
    source       text,
    proof        text,
    wording      text,
    off_hours    boolean NOT NULL DEFAULT false,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);
CREATE INDEX consents_lookup ON pbxguard.consents (consumer, order_giver, given_at DESC);

CREATE TABLE pbxguard.contracts (
    consumer     text NOT NULL,
    id           bigserial,
    order_giver  text NOT NULL,
    until        date NOT NULL,
    reference    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);
CREATE INDEX contracts_lookup ON pbxguard.contracts (consumer, order_giver, until DESC);

CREATE TABLE pbxguard.refusals (
    consumer     text NOT NULL,
    id           bigserial,
    order_giver  text NOT NULL,
    refused_at   timestamptz NOT NULL,
    source       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);
CREATE INDEX refusals_lookup ON pbxguard.refusals (consumer, order_giver, refused_at DESC);

-- order_giver NULL: the consumer opposed every order giver served here.
CREATE TABLE pbxguard.oppositions (
    consumer     text NOT NULL,
    id           bigserial,
    order_giver  text,
    opposed_at   timestamptz NOT NULL,
    source       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);
CREATE INDEX oppositions_lookup ON pbxguard.oppositions (consumer, order_giver);

CREATE TABLE pbxguard.bloctel_cleanings (
    id           bigserial PRIMARY KEY,
    order_giver  text NOT NULL REFERENCES pbxguard.order_givers (name),
    cleaned_on   date NOT NULL,
    status       text NOT NULL CHECK (status IN ('cleared', 'registered')),
    filename     text,
    row_count    integer NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now()
);

-- The latest Bloctel answer for a consumer, per order giver's subscription.
CREATE TABLE pbxguard.bloctel_status (
    consumer     text NOT NULL,
    order_giver  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('cleared', 'registered')),
    cleaned_on   date NOT NULL,
    cleaning_id  bigint NOT NULL,
    PRIMARY KEY (consumer, order_giver)
);

CREATE TABLE pbxguard.attempts (
    consumer      text NOT NULL,
    id            bigserial,
    order_giver   text NOT NULL,
    campaign      text NOT NULL,
    decision_id   uuid NOT NULL,
    attempted_at  timestamptz NOT NULL,
    outcome       text,
    outcome_at    timestamptz,
    duration_s    integer,
    PRIMARY KEY (consumer, id)
);
CREATE INDEX attempts_window ON pbxguard.attempts (consumer, order_giver, attempted_at DESC);
CREATE INDEX attempts_decision ON pbxguard.attempts (decision_id);

-- The decision journal: one row per decision, written in the transaction that records the attempt.
CREATE TABLE pbxguard.decisions (
    consumer         text NOT NULL,
    id               uuid NOT NULL,
    call_key         text,
    decided_at       timestamptz NOT NULL,
    gate             text NOT NULL,
    campaign         text NOT NULL,
    order_giver      text,
    caller_id        text NOT NULL,
    verdict          text NOT NULL CHECK (verdict IN ('allow', 'block')),
    reasons          text[] NOT NULL,
    shadow           boolean NOT NULL DEFAULT false,
    counted          boolean NOT NULL DEFAULT false,
    via_token        uuid,
    territories      text[] NOT NULL DEFAULT '{}',
    zones            text[] NOT NULL DEFAULT '{}',
    next_allowed_at  timestamptz,
    outcome          text,
    outcome_at       timestamptz,
    duration_s       integer,
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, id),
    UNIQUE (consumer, call_key)
);
CREATE INDEX decisions_id ON pbxguard.decisions (id);
CREATE INDEX decisions_time ON pbxguard.decisions (decided_at);
