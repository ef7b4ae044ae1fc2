"""Wire declarations of the programs ``virnetd`` serves (SPEC section 3).

Shared by the daemon (handlers) and by clients (the CLI, the library); each module
declares one program's structures and procedures and nothing else.
"""
