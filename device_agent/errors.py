"""The one error base of the board agent."""


class AgentError(Exception):
    """A failure the user can act on. The message says what failed and what to do next."""
