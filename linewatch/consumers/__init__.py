"""Consumers of a line's Redis streams: the reject gate (``linewatch plc``) and alarms
(``linewatch alarms``).

Each reads through a Redis consumer group (:mod:`linewatch.consumers.group`), so a
crashed consumer's entries are taken over by another, and acknowledges an entry only
once it has been acted on: delivery is at least once.
"""
