"""Everything the notiflow services agree on.

Message schemas (:mod:`contracts.messages`), broker names (:mod:`contracts.topology`),
settings (:mod:`contracts.settings`), tokens (:mod:`contracts.auth`), the database
helpers and migrations (:mod:`contracts.db`, :mod:`contracts.migrate`) and the outbox
relay (:mod:`contracts.outbox`). A service imports this package, never another service.
"""
