"""The tuning session: tasks, the warm builder, the board runner, the session driver."""
