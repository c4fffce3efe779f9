"""The load generator: asyncio on uvloop with picows clients, one process pinned to its own core.

Run as ``python -m bench.loadgen MODE ...``; it prints one JSON object as its last line.
It reads the server's CPU time and RSS itself (``--server-pid``), right at the edges of its
measurement window, so the figures cover exactly the traffic it generated.
"""
