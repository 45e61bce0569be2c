"""cove guest agent: serves docs/guest-protocol.md inside a sandbox, as its pid 1.

In a sandbox it is entered without an exec: the launcher, which has this module imported (and with
it every module of the agent, before the sandbox's root replaces the host's), clones itself into
the sandbox's namespaces and calls main() (launcher.py). A root with its own /usr runs it as
``python3 -I -S /run/cove/agent.pyc`` with the other modules' .pyc files beside it, flat; run so,
it makes that directory the package the modules import each other from.

Standard library only. The start path imports C modules (``_socket``, ``_signal``, ``select``)
instead of their Python wrappers, which would pull in ``enum``/``re`` and double the start-up time
(for the same reason it spells out try/except/pass: ``contextlib`` alone costs ~9 ms to import).

The modules: serve (pid 1's loop and main), handler (a connection's requests), files and entries,
exec (foreground commands) and command (what exec and spawn share), processes, supervisor and
registry (background processes), watch, users, config, request, errors, wakeup; protocol (the
framing, shared with the host).

Test mode (outside a sandbox): ``agent.py --socket PATH [--config FILE]``.
"""

from __future__ import annotations

import sys

if __package__:
    from .serve import main
else:  # run as a script (-I leaves its directory off sys.path): that directory is the package
    import os

    sys.modules["cove"] = type(sys)("cove")  # an import of cove.guest.X looks its top level up
    sys.modules["cove.guest"] = _package = type(sys)("cove.guest")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    from cove.guest.serve import main

if __name__ == "__main__":
    main(sys.argv[1:])
