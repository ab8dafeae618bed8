"""Development and test helpers: a local OpenID Connect provider and a demo upstream app.

DEVELOPMENT / TEST ONLY -- NOT FOR PRODUCTION. The provider in
``sidecar.dev.provider`` signs tokens with keys generated at start-up, lets
anyone "sign in" as a canned user with one click, exposes an unauthenticated
``/_control/`` API that changes its behaviour, and keeps everything in memory.
It exists so ``make run`` and the test suite can exercise the sidecar against a
real HTTP provider (including faults, key rotation and refresh-token reuse
detection) without an external identity service. Never expose it to a network
you do not control, and never point a production sidecar at it.

Submodules are deliberately not imported here so ``python -m
sidecar.dev.provider`` runs without a double-import warning.
"""
