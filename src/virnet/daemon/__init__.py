"""virnetd: the daemon serving FILES (and later CONSOLE and MIGRATION) over virnet."""
