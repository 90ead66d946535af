"""The CLI's exit codes (README: CLI exit codes). Scripts and CI jobs tell outcomes apart by them."""

from __future__ import annotations

#: done; with --follow (and ``deploy``): the rollout or deployment completed
OK = 0
#: the controller refused the request or could not be reached (the message says which and why)
ERROR = 1
#: usage: bad arguments, or a file given (plan, options) is missing or invalid; nothing was sent
USAGE = 2
#: followed to its end, the rollout was aborted or the deployment failed or was cancelled
FAILED = 3
#: interrupted (Ctrl-C) while following: the rollout or deployment itself goes on
INTERRUPTED = 130
