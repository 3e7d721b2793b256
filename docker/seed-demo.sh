#!/bin/sh
# Seeds the demo ledger: one campaign, its authorised caller ID, consents for some numbers, one
# opposition and one refusal. Safe to run again (campaigns are upserts; extra consent rows change
# nothing).
set -eu
pbxguard db migrate
pbxguard campaign add demo --order-giver ACME --automated
pbxguard caller-id authorize +33162123456 --order-giver ACME --from 2026-01-01
for number in +33612345678 +33612345679 +33612345670 +33612345671; do
    pbxguard consent add "$number" --order-giver ACME --source demo
done
pbxguard opposition add +33612345670 --order-giver ACME --source demo
pbxguard refusal add +33612345671 --order-giver ACME --source demo
echo "demo ledger seeded"
