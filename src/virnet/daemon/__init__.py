"""virnetd: the daemon serving FILES, CONSOLE and MIGRATION over virnet."""
