"""The one error base of the workstation toolkit."""

from device_agent.errors import AgentError


class EdgetuneError(Exception):
    """A failure the user can act on. The message says what failed and what to do next."""


class TrackerUnreachable(EdgetuneError):
    """The tracker did not answer within its deadline."""


class NoBoardError(EdgetuneError):
    """No board of the key was free (or registered) before the deadline."""


__all__ = ["AgentError", "EdgetuneError", "NoBoardError", "TrackerUnreachable"]
