"""Wire declarations of the programs ``virnetd`` serves (docs/protocol.md).

Shared by the daemon (handlers) and by clients (the CLI, the library); each module
declares one program's structures and procedures and nothing else.
"""
