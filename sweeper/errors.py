"""One-line descriptions of the errors Ray itself raises when a trial's process dies.

A trial whose worker process is killed (SIGKILL, the OOM killer, a segfault) fails in Tune
with Ray's ``ActorDiedError``, whose text is a block like::

    The actor died unexpectedly before finishing this task.
    	class_name: ImplicitFunc
    	pid: 16717
    	ip: 192.0.2.2
    The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR
    Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes ...

The generic "last ``Name: message`` line" rule would report its ``ip: 192.0.2.2`` line;
:func:`worker_death_line` turns it into ``WorkerDied: the trial's worker process (pid
16717 on 192.0.2.2) died or was killed; exit type SYSTEM_ERROR: Worker unexpectedly exits
with a connection error code 2. End of file.``
"""

from __future__ import annotations

import re

_DIED = re.compile(r"The actor died unexpectedly|worker process has died|A worker died or was killed")
_FIELD = re.compile(r"^\s*(pid|ip|class_name|name)\s*:\s*(\S+)\s*$", re.M)
_EXIT_TYPE = re.compile(r"Worker exit type:\s*([A-Z_]+)")
_EXIT_DETAIL = re.compile(r"Worker exit detail:\s*(.+?)(?:\s+Some common causes|\s*$)", re.S)
_NODE_DIED = re.compile(r"node[^\n]*(?:died|dead|was terminated)", re.I)


def worker_death_line(text: str) -> str | None:
    """The real reason of a Ray actor/worker death in ``text`` (an error file, an exception's
    message), as one line; None when ``text`` is not about a dead worker."""
    if not _DIED.search(text):
        return None
    fields = {k: v for k, v in _FIELD.findall(text)}
    where = ", ".join(x for x in (f"pid {fields['pid']}" if "pid" in fields else "",
                                   f"on {fields['ip']}" if "ip" in fields else "") if x)
    line = "WorkerDied: the trial's worker process" + (f" ({where.replace(', on', ' on')})" if where else "")
    line += " died or was killed"
    et = _EXIT_TYPE.search(text)
    detail = _EXIT_DETAIL.search(text)
    if et:
        line += f"; exit type {et.group(1)}"
    if detail:
        d = " ".join(detail.group(1).split())
        line += f": {d[:200]}"
    elif _NODE_DIED.search(text):
        line += ": its node died"
    return line
