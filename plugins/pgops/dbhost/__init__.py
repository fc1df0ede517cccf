"""Database-host access: one object per node that answers every file, process and port question on that host."""

from pgops.dbhost.host import DbHost, DbHostError, Postmaster

__all__ = ["DbHost", "DbHostError", "Postmaster"]
