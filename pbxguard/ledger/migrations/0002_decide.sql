-- pbxguard.decide: one round trip per decision.
--
-- The pure rules (hours, caller-ID ranges, destination) have already run in the daemon, which also
-- turned the consumer's time zones into plain thresholds.  This function reads the campaign and the
-- consumer's facts, applies the ledger rules, records the attempt when the call may proceed and
-- journals the decision, all in one transaction, serialised per (consumer, order giver) by an
-- advisory lock so that no number of daemons can exceed the frequency cap.
--
-- It mirrors pbxguard/policy/*.py; the daemon re-evaluates the returned facts with those modules and
-- refuses the call if both disagree, and tests/ledger/test_decide_parity.py compares them.

CREATE FUNCTION pbxguard.decide(
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
    v_contract     boolean;
    v_consent      boolean;
    v_off_hours    boolean;
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

    -- The ledger rules (pbxguard/policy/*.py).
    v_consumer := c.purpose IN ('b2c_prospecting', 'contract_service');
    v_contract := contract_until IS NOT NULL AND contract_until >= p_today;
    v_consent := consent_at IS NOT NULL AND (p_consent_since IS NULL OR consent_at >= p_consent_since);
    v_off_hours := off_hours_consent_at IS NOT NULL
                   AND (p_consent_since IS NULL OR off_hours_consent_at >= p_consent_since);

    IF v_consumer AND c.sector IN ('renovation_energetique', 'adaptation_logement', 'formation_cpf')
       AND NOT v_contract THEN
        v_reasons := array_append(v_reasons, 'SECTOR_BANNED');
    END IF;
    IF c.automated AND p_caller_kind IN ('territorial', 'mobile') THEN
        v_reasons := array_append(v_reasons, 'CALLER_ID_NOT_NPV');
    END IF;
    IF p_auth_required AND NOT caller_id_authorized THEN
        v_reasons := array_append(v_reasons, 'CALLER_ID_NOT_AUTHORIZED');
    END IF;
    v_consumer := v_consumer AND p_consumer_valid;
    IF v_consumer THEN
        IF NOT v_contract THEN
            IF p_consent_regime THEN
                IF NOT v_consent THEN
                    v_reasons := array_append(v_reasons, 'NO_CONSENT');
                END IF;
            ELSIF bloctel_status = 'registered' THEN
                v_reasons := array_append(v_reasons, 'BLOCTEL_REGISTERED');
            ELSIF bloctel_status IS DISTINCT FROM 'cleared' OR bloctel_on < p_bloctel_since
                  OR bloctel_on > p_today THEN
                v_reasons := array_append(v_reasons, 'BLOCTEL_STALE');
            END IF;
            IF c.prerecorded AND NOT v_consent AND NOT ('NO_CONSENT' = ANY (v_reasons)) THEN
                v_reasons := array_append(v_reasons, 'NO_CONSENT');
            END IF;
        END IF;
        IF opposed THEN
            v_reasons := array_append(v_reasons, 'OPPOSED');
        END IF;
        IF last_refusal_at >= p_refusal_since THEN
            v_reasons := array_append(v_reasons, 'REFUSAL_QUIET_PERIOD');
        END IF;
        IF NOT v_off_hours THEN
            v_reasons := v_reasons || coalesce(p_hours, '{}');
        END IF;
        IF (SELECT count(*) FROM unnest(recent_attempts) a WHERE a >= p_window_start) >= p_cap THEN
            v_reasons := array_append(v_reasons, 'FREQUENCY_CAP');
        END IF;
    END IF;

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
