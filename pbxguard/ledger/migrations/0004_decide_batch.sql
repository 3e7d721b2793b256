-- Batched decisions.
--
-- Decisions that reach the ledger together are decided in one statement and one transaction: one
-- commit (one WAL flush), one round trip and one executor start for the lot.  decide_batch takes
-- the same arguments as decide, one array per argument and one element per decision, and returns
-- decide's columns in the same order, with `ord`.  The daemon never puts two decisions for one
-- consumer in the same batch.
--
-- The ledger rules now live in one place, ledger_reasons(), which both decide and decide_batch
-- call; it mirrors pbxguard/policy/*.py and tests/ledger/test_ledger.py checks both against them.

-- The ledger rules (pbxguard/policy/*.py), on facts already read.
CREATE FUNCTION pbxguard.ledger_reasons(
    p_static text[], p_hours text[], p_purpose text, p_sector text, p_automated boolean,
    p_prerecorded boolean, p_caller_kind text, p_auth_required boolean, p_caller_id_authorized boolean,
    p_consumer_valid boolean, p_contract_until date, p_today date, p_consent_at timestamptz,
    p_off_hours_at timestamptz, p_consent_since timestamptz, p_consent_regime boolean,
    p_bloctel_status text, p_bloctel_on date, p_bloctel_since date, p_opposed boolean,
    p_last_refusal_at timestamptz, p_refusal_since timestamptz, p_recent timestamptz[],
    p_window_start timestamptz, p_cap integer
) RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    v_reasons      text[] := coalesce(p_static, '{}');
    v_consumer     boolean := p_purpose IN ('b2c_prospecting', 'contract_service');
    v_contract     boolean := p_contract_until IS NOT NULL AND p_contract_until >= p_today;
    v_consent      boolean := p_consent_at IS NOT NULL AND (p_consent_since IS NULL OR p_consent_at >= p_consent_since);
    v_off_hours    boolean := p_off_hours_at IS NOT NULL AND (p_consent_since IS NULL OR p_off_hours_at >= p_consent_since);
    v_recent integer := 0;
    a timestamptz;
BEGIN
    IF v_consumer AND p_sector IN ('renovation_energetique', 'adaptation_logement', 'formation_cpf')
       AND NOT v_contract THEN
        v_reasons := array_append(v_reasons, 'SECTOR_BANNED');
    END IF;
    IF p_automated AND p_caller_kind IN ('territorial', 'mobile') THEN
        v_reasons := array_append(v_reasons, 'CALLER_ID_NOT_NPV');
    END IF;
    IF p_auth_required AND NOT p_caller_id_authorized THEN
        v_reasons := array_append(v_reasons, 'CALLER_ID_NOT_AUTHORIZED');
    END IF;
    v_consumer := v_consumer AND p_consumer_valid;
    IF v_consumer THEN
        IF NOT v_contract THEN
            IF p_consent_regime THEN
                IF NOT v_consent THEN
                    v_reasons := array_append(v_reasons, 'NO_CONSENT');
                END IF;
            ELSIF p_bloctel_status = 'registered' THEN
                v_reasons := array_append(v_reasons, 'BLOCTEL_REGISTERED');
            ELSIF p_bloctel_status IS DISTINCT FROM 'cleared' OR p_bloctel_on < p_bloctel_since
                  OR p_bloctel_on > p_today THEN
                v_reasons := array_append(v_reasons, 'BLOCTEL_STALE');
            END IF;
            IF p_prerecorded AND NOT v_consent AND NOT ('NO_CONSENT' = ANY (v_reasons)) THEN
                v_reasons := array_append(v_reasons, 'NO_CONSENT');
            END IF;
        END IF;
        IF p_opposed THEN
            v_reasons := array_append(v_reasons, 'OPPOSED');
        END IF;
        IF p_last_refusal_at >= p_refusal_since THEN
            v_reasons := array_append(v_reasons, 'REFUSAL_QUIET_PERIOD');
        END IF;
        IF NOT v_off_hours THEN
            v_reasons := v_reasons || coalesce(p_hours, '{}');
        END IF;
        FOREACH a IN ARRAY coalesce(p_recent, '{}') LOOP
            IF a >= p_window_start THEN v_recent := v_recent + 1; END IF;
        END LOOP;
        IF v_recent >= p_cap THEN
            v_reasons := array_append(v_reasons, 'FREQUENCY_CAP');
        END IF;
    END IF;
    RETURN v_reasons;
END;
$fn$;

-- decide() as in 0002, its rules now ledger_reasons().
CREATE OR REPLACE FUNCTION pbxguard.decide(
    p_decision_id     uuid,
    p_call_key        text,
    p_now             timestamptz,
    p_consumer        text,
    p_consumer_valid  boolean,
    p_campaign        text,
    p_caller_id       text,
    p_caller_kind     text,
    p_auth_required   boolean,
    p_gate            text,
    p_reserve         boolean,
    p_shadow          boolean,
    p_residence       text,
    p_static          text[],
    p_hours           text[],
    p_window_start    timestamptz,
    p_refusal_since   timestamptz,
    p_bloctel_since   date,
    p_today           date,
    p_consent_since   timestamptz,
    p_consent_regime  boolean,
    p_cap             integer,
    p_territories     text[],
    p_zones           text[],
    p_token           uuid
) RETURNS TABLE (
    status                 text,
    decision_id            uuid,
    reasons                text[],
    counted                boolean,
    decided_at             timestamptz,
    next_allowed_at        timestamptz,
    shadow                 boolean,
    order_giver            text,
    purpose                text,
    sector                 text,
    automated              boolean,
    prerecorded            boolean,
    siren                  text,
    script_id              text,
    residence_territory    text,
    residence_departement  text,
    opposed                boolean,
    last_refusal_at        timestamptz,
    consent_at             timestamptz,
    off_hours_consent_at   timestamptz,
    contract_until         date,
    bloctel_status         text,
    bloctel_on             date,
    recent_attempts        timestamptz[],
    caller_id_authorized   boolean
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    c              record;
    d              pbxguard.decisions%ROWTYPE;
    v_reasons      text[] := coalesce(p_static, '{}');
    v_consumer     boolean;
    v_verdict      text;
    v_counted      boolean := false;
BEGIN
    -- Statements are few on purpose: each costs an executor start-up, and this is the hot path.
    SELECT x.*, o.siren, r.territory AS res_t, r.departement AS res_d INTO c
      FROM pbxguard.campaigns x
      JOIN pbxguard.order_givers o ON o.name = x.order_giver
      LEFT JOIN pbxguard.consumers r ON r.consumer = p_consumer
     WHERE x.id = p_campaign;

    IF c.id IS NULL THEN
        v_reasons := array_append(v_reasons, 'UNKNOWN_CAMPAIGN');
        IF p_call_key IS NOT NULL THEN
            SELECT * INTO d FROM pbxguard.decisions x
             WHERE x.consumer = p_consumer AND x.call_key = p_call_key;
            IF FOUND THEN
                RETURN QUERY SELECT 'replayed'::text, d.id, d.reasons, d.counted, d.decided_at,
                    d.next_allowed_at, d.shadow, d.order_giver, NULL::text, NULL::text, NULL::boolean,
                    NULL::boolean, NULL::text, NULL::text, NULL::text, NULL::text, NULL::boolean,
                    NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::date, NULL::text,
                    NULL::date, NULL::timestamptz[], NULL::boolean;
                RETURN;
            END IF;
        END IF;
        IF p_reserve THEN
            INSERT INTO pbxguard.decisions (consumer, id, call_key, decided_at, gate, campaign,
                caller_id, verdict, reasons, shadow, territories, zones)
            VALUES (p_consumer, p_decision_id, p_call_key, p_now, p_gate, p_campaign, p_caller_id,
                'block', v_reasons, p_shadow, p_territories, p_zones);
        END IF;
        RETURN QUERY SELECT 'decided'::text, p_decision_id, v_reasons, false, p_now,
            NULL::timestamptz, p_shadow, NULL::text, NULL::text, NULL::text, NULL::boolean,
            NULL::boolean, NULL::text, NULL::text, NULL::text, NULL::text, NULL::boolean,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::date, NULL::text,
            NULL::date, NULL::timestamptz[], NULL::boolean;
        RETURN;
    END IF;

    -- The daemon derived the consumer's places from the residence it assumed; if the CRM has
    -- changed it since, nothing is written and the daemon asks again with the right one.
    IF coalesce(c.res_t, '') || '|' || coalesce(c.res_d, '') <> p_residence THEN
        RETURN QUERY SELECT 'retry'::text, p_decision_id, NULL::text[], false, p_now,
            NULL::timestamptz, p_shadow, c.order_giver, c.purpose, c.sector, c.automated,
            c.prerecorded, c.siren, c.script_id, c.res_t, c.res_d, NULL::boolean,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::date, NULL::text,
            NULL::date, NULL::timestamptz[], NULL::boolean;
        RETURN;
    END IF;

    IF p_reserve THEN
        -- Serialises decisions for one (consumer, order giver): the count read below cannot change
        -- before this transaction's attempt is inserted, whichever daemon asks.
        PERFORM pg_advisory_xact_lock(hashtextextended(p_consumer || chr(31) || c.order_giver, 0));
    END IF;
    IF p_call_key IS NOT NULL THEN
        -- Checked under the lock: a duplicate that waited finds the first one's decision.
        SELECT * INTO d FROM pbxguard.decisions x
         WHERE x.consumer = p_consumer AND x.call_key = p_call_key;
        IF FOUND THEN
            RETURN QUERY SELECT 'replayed'::text, d.id, d.reasons, d.counted, d.decided_at,
                d.next_allowed_at, d.shadow, d.order_giver, NULL::text, NULL::text,
                NULL::boolean, NULL::boolean, NULL::text, NULL::text, NULL::text, NULL::text,
                NULL::boolean, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
                NULL::date, NULL::text, NULL::date, NULL::timestamptz[], NULL::boolean;
            RETURN;
        END IF;
    END IF;
    -- A channel already allowed (and counted) by another gate for this number passes once more
    -- without a second count.
    IF p_reserve AND p_token IS NOT NULL AND EXISTS (
        SELECT 1 FROM pbxguard.decisions x
         WHERE x.consumer = p_consumer AND x.id = p_token
           AND (x.verdict = 'allow' OR x.shadow)
           AND x.decided_at >= p_now - interval '1 hour' AND x.decided_at <= p_now + interval '1 minute')
    THEN
        INSERT INTO pbxguard.decisions (consumer, id, call_key, decided_at, gate, campaign,
            order_giver, caller_id, verdict, reasons, shadow, via_token, territories, zones)
        VALUES (p_consumer, p_decision_id, p_call_key, p_now, p_gate, p_campaign,
            c.order_giver, p_caller_id, 'allow', '{}', false, p_token, p_territories, p_zones);
        RETURN QUERY SELECT 'token'::text, p_decision_id, '{}'::text[], false, p_now,
            NULL::timestamptz, false, c.order_giver, c.purpose, c.sector, c.automated,
            c.prerecorded, c.siren, c.script_id, c.res_t, c.res_d, NULL::boolean,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::date,
            NULL::text, NULL::date, NULL::timestamptz[], NULL::boolean;
        RETURN;
    END IF;

    -- The facts, in one statement.
    SELECT
        EXISTS (SELECT 1 FROM pbxguard.oppositions x
                 WHERE x.consumer = p_consumer
                   AND (x.order_giver IS NULL OR x.order_giver = c.order_giver)),
        (SELECT max(x.refused_at) FROM pbxguard.refusals x
          WHERE x.consumer = p_consumer AND x.order_giver = c.order_giver),
        k.given, k.off_hours,
        (SELECT max(x.until) FROM pbxguard.contracts x
          WHERE x.consumer = p_consumer AND x.order_giver = c.order_giver),
        b.status, b.cleaned_on,
        ARRAY(SELECT x.attempted_at FROM pbxguard.attempts x
               WHERE x.consumer = p_consumer AND x.order_giver = c.order_giver
               ORDER BY x.attempted_at DESC LIMIT p_cap),
        EXISTS (SELECT 1 FROM pbxguard.caller_id_authorizations x
                 WHERE x.caller_id = p_caller_id AND x.order_giver = c.order_giver
                   AND x.valid_from <= p_today
                   AND (x.valid_until IS NULL OR x.valid_until >= p_today))
      INTO opposed, last_refusal_at, consent_at, off_hours_consent_at, contract_until,
           bloctel_status, bloctel_on, recent_attempts, caller_id_authorized
      FROM (SELECT max(x.given_at) AS given, max(x.given_at) FILTER (WHERE x.off_hours) AS off_hours
              FROM pbxguard.consents x
             WHERE x.consumer = p_consumer AND x.order_giver = c.order_giver
               AND x.given_at <= p_now AND (x.revoked_at IS NULL OR x.revoked_at > p_now)) k
      LEFT JOIN pbxguard.bloctel_status b ON b.consumer = p_consumer AND b.order_giver = c.order_giver;

    v_reasons := pbxguard.ledger_reasons(v_reasons, p_hours, c.purpose, c.sector, c.automated,
        c.prerecorded, p_caller_kind, p_auth_required, caller_id_authorized, p_consumer_valid,
        contract_until, p_today, consent_at, off_hours_consent_at, p_consent_since, p_consent_regime,
        bloctel_status, bloctel_on, p_bloctel_since, opposed, last_refusal_at, p_refusal_since,
        recent_attempts, p_window_start, p_cap);
    v_consumer := c.purpose IN ('b2c_prospecting', 'contract_service') AND p_consumer_valid;

    v_verdict := CASE WHEN cardinality(v_reasons) = 0 THEN 'allow' ELSE 'block' END;
    IF p_reserve THEN
        v_counted := v_consumer AND (v_verdict = 'allow' OR p_shadow);
        WITH attempt AS (
            INSERT INTO pbxguard.attempts (consumer, order_giver, campaign, decision_id, attempted_at)
            SELECT p_consumer, c.order_giver, c.id, p_decision_id, p_now WHERE v_counted
        )
        INSERT INTO pbxguard.decisions (consumer, id, call_key, decided_at, gate, campaign,
            order_giver, caller_id, verdict, reasons, shadow, counted, territories, zones)
        VALUES (p_consumer, p_decision_id, p_call_key, p_now, p_gate, p_campaign, c.order_giver,
            p_caller_id, v_verdict, v_reasons, p_shadow AND v_verdict = 'block', v_counted,
            p_territories, p_zones);
    END IF;

    status := 'decided';
    decision_id := p_decision_id;
    reasons := v_reasons;
    counted := v_counted;
    decided_at := p_now;
    next_allowed_at := NULL;
    shadow := p_shadow AND v_verdict = 'block';
    order_giver := c.order_giver;
    purpose := c.purpose;
    sector := c.sector;
    automated := c.automated;
    prerecorded := c.prerecorded;
    siren := c.siren;
    script_id := c.script_id;
    residence_territory := c.res_t;
    residence_departement := c.res_d;
    RETURN NEXT;
END;
$fn$;

CREATE FUNCTION pbxguard.decide_batch(
    p_decision_id uuid[], p_call_key text[], p_now timestamptz[], p_consumer text[],
    p_consumer_valid boolean[], p_campaign text[], p_caller_id text[], p_caller_kind text[],
    p_auth_required boolean[], p_gate text[], p_reserve boolean[], p_shadow boolean[],
    p_residence text[], p_static text[], p_hours text[], p_window_start timestamptz[],
    p_refusal_since timestamptz[], p_bloctel_since date[], p_today date[],
    p_consent_since timestamptz[], p_consent_regime boolean[], p_cap integer[],
    p_territories text[], p_zones text[], p_token uuid[]
) RETURNS TABLE (
    ord bigint, status text, decision_id uuid, reasons text[], counted boolean, decided_at timestamptz,
    next_allowed_at timestamptz, shadow boolean, order_giver text, purpose text, sector text,
    automated boolean, prerecorded boolean, siren text, script_id text, residence_territory text,
    residence_departement text, opposed boolean, last_refusal_at timestamptz, consent_at timestamptz,
    off_hours_consent_at timestamptz, contract_until date, bloctel_status text, bloctel_on date,
    recent_attempts timestamptz[], caller_id_authorized boolean
)
LANGUAGE plpgsql
-- A custom plan would be re-planned for every batch (milliseconds for this statement); the generic
-- one is right for any batch, as every lookup goes through the consumer's index.
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    -- Every (consumer, order giver) of the batch, in one order for every caller, before the facts
    -- are read: the next statement's snapshot then sees every attempt committed before the locks.
    PERFORM pg_advisory_xact_lock(s.k) FROM (
        SELECT DISTINCT hashtextextended(u.consumer || chr(31) || x.order_giver, 0) AS k
          FROM unnest(p_consumer, p_campaign, p_reserve) AS u(consumer, campaign, reserve)
          JOIN pbxguard.campaigns x ON x.id = u.campaign
         WHERE u.reserve
         ORDER BY 1) s;
    -- Rows that need one of decide()'s rarer paths (unknown campaign, a token, a residence that
    -- changed, a call key already decided) come back as 'single': the daemon sends those alone.
    -- MATERIALIZED: inlined, each fact's subquery would run once per use, not once per row.
    RETURN QUERY
    WITH u AS (
        SELECT * FROM unnest(p_decision_id, p_call_key, p_now, p_consumer, p_consumer_valid,
            p_campaign, p_caller_id, p_caller_kind, p_auth_required, p_gate, p_reserve, p_shadow,
            p_residence, p_static, p_hours, p_window_start, p_refusal_since, p_bloctel_since, p_today,
            p_consent_since, p_consent_regime, p_cap, p_territories, p_zones, p_token)
        WITH ORDINALITY AS u(decision_id, call_key, now, consumer, consumer_valid, campaign,
            caller_id, caller_kind, auth_required, gate, reserve, shadow, residence, static, hours,
            window_start, refusal_since, bloctel_since, today, consent_since, consent_regime, cap,
            territories, zones, token, ord)
    ), c AS (
        SELECT u.*, x.order_giver, x.purpose, x.sector, x.automated, x.prerecorded, x.script_id,
               o.siren, r.territory AS res_t, r.departement AS res_d,
               (x.id IS NOT NULL AND u.token IS NULL
                AND coalesce(r.territory, '') || '|' || coalesce(r.departement, '') = u.residence
                AND (u.call_key IS NULL OR (
                     SELECT true FROM pbxguard.decisions d
                      WHERE d.consumer = u.consumer AND d.call_key = u.call_key LIMIT 1) IS NULL)) AS fast
          FROM u
          LEFT JOIN pbxguard.campaigns x ON x.id = u.campaign
          LEFT JOIN pbxguard.order_givers o ON o.name = x.order_giver
          LEFT JOIN pbxguard.consumers r ON r.consumer = u.consumer
    ), f AS MATERIALIZED (
        SELECT c.*,
            EXISTS (SELECT 1 FROM pbxguard.oppositions x
                     WHERE x.consumer = c.consumer
                       AND (x.order_giver IS NULL OR x.order_giver = c.order_giver)) AS f_opposed,
            (SELECT max(x.refused_at) FROM pbxguard.refusals x
              WHERE x.consumer = c.consumer AND x.order_giver = c.order_giver) AS f_refused,
            (SELECT max(x.given_at) FROM pbxguard.consents x
              WHERE x.consumer = c.consumer AND x.order_giver = c.order_giver
                AND x.given_at <= c.now AND (x.revoked_at IS NULL OR x.revoked_at > c.now)) AS f_consent,
            (SELECT max(x.given_at) FROM pbxguard.consents x
              WHERE x.consumer = c.consumer AND x.order_giver = c.order_giver AND x.off_hours
                AND x.given_at <= c.now AND (x.revoked_at IS NULL OR x.revoked_at > c.now)) AS f_off_hours,
            (SELECT max(x.until) FROM pbxguard.contracts x
              WHERE x.consumer = c.consumer AND x.order_giver = c.order_giver) AS f_contract,
            b.status AS f_bloctel, b.cleaned_on AS f_bloctel_on,
            ARRAY(SELECT x.attempted_at FROM pbxguard.attempts x
                   WHERE x.consumer = c.consumer AND x.order_giver = c.order_giver
                   ORDER BY x.attempted_at DESC LIMIT c.cap) AS f_recent,
            EXISTS (SELECT 1 FROM pbxguard.caller_id_authorizations x
                     WHERE x.caller_id = c.caller_id AND x.order_giver = c.order_giver
                       AND x.valid_from <= c.today
                       AND (x.valid_until IS NULL OR x.valid_until >= c.today)) AS f_authorized
          FROM c
          LEFT JOIN pbxguard.bloctel_status b ON b.consumer = c.consumer AND b.order_giver = c.order_giver
         WHERE c.fast
    ), g AS (
        SELECT f.*, pbxguard.ledger_reasons(string_to_array(f.static, ','), string_to_array(f.hours, ','),
            f.purpose, f.sector, f.automated, f.prerecorded, f.caller_kind, f.auth_required,
            f.f_authorized, f.consumer_valid, f.f_contract, f.today, f.f_consent, f.f_off_hours,
            f.consent_since, f.consent_regime, f.f_bloctel, f.f_bloctel_on, f.bloctel_since,
            f.f_opposed, f.f_refused, f.refusal_since, f.f_recent, f.window_start, f.cap) AS v_reasons
          FROM f
    ), h AS (
        SELECT g.*, cardinality(g.v_reasons) = 0 AS v_allow,
               g.reserve AND g.consumer_valid AND g.purpose IN ('b2c_prospecting', 'contract_service')
                 AND (cardinality(g.v_reasons) = 0 OR g.shadow) AS v_counted
          FROM g
    ), attempt AS (
        INSERT INTO pbxguard.attempts (consumer, order_giver, campaign, decision_id, attempted_at)
        SELECT h.consumer, h.order_giver, h.campaign, h.decision_id, h.now FROM h WHERE h.v_counted
    ), journal AS (
        INSERT INTO pbxguard.decisions (consumer, id, call_key, decided_at, gate, campaign,
            order_giver, caller_id, verdict, reasons, shadow, counted, territories, zones)
        SELECT h.consumer, h.decision_id, h.call_key, h.now, h.gate, h.campaign, h.order_giver,
            h.caller_id, CASE WHEN h.v_allow THEN 'allow' ELSE 'block' END, h.v_reasons,
            h.shadow AND NOT h.v_allow, h.v_counted, string_to_array(h.territories, ','),
            string_to_array(h.zones, ',')
          FROM h WHERE h.reserve
    )
    SELECT c.ord, CASE WHEN c.fast THEN 'decided' ELSE 'single' END, c.decision_id, h.v_reasons,
        coalesce(h.v_counted, false), c.now, NULL::timestamptz, c.shadow AND NOT coalesce(h.v_allow, true),
        c.order_giver, c.purpose, c.sector, c.automated, c.prerecorded, c.siren, c.script_id, c.res_t,
        c.res_d, h.f_opposed, h.f_refused, h.f_consent, h.f_off_hours, h.f_contract, h.f_bloctel,
        h.f_bloctel_on, h.f_recent, h.f_authorized
      FROM c LEFT JOIN h ON h.ord = c.ord
     ORDER BY c.ord;
END;
$fn$;
