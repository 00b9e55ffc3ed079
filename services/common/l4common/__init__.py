"""l4common: the few helpers the proxy, the upstream and the client share.

Pure and dependency-free (standard library only), so each image can carry it next to
its own package (``COPY services/common/l4common /app/l4common``):

* :mod:`l4common.errors`: :class:`~l4common.errors.ConfigError`, a key and a problem;
* :mod:`l4common.durations`: ``"250ms"``, ``"2s"``, ``"1m"``, ``"1h"`` -> seconds;
* :mod:`l4common.addresses`: ``host:port`` and ``[v6]:port`` -> :class:`Address`;
* :mod:`l4common.logs`: the JSON log line (``ts`` and ``event`` first, one per line).

What differs between the services (which port a key may name, whether a duration may be
zero, which fields a log line carries) is theirs and stays in them.
"""
