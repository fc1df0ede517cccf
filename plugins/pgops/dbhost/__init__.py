"""The database host: where commands run (runners), its processes (procs), one access point per node (host),
the backup engine's command lines (engines), the cutover's quiesce."""
