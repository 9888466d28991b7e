"""The root of liqmon's own errors.

Every condition that stops liqmon with a message an operator can act on (a missing topic, a
corrupt checkpoint, a broker that refuses a message for good, …) derives from `LiqmonError`,
so the command line reports all of them the same way, in one line with exit status 1, without
having to list each one.
"""

from __future__ import annotations


class LiqmonError(RuntimeError):
    """A condition that stops liqmon with a message an operator can act on."""
