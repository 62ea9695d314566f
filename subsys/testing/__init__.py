"""Local processes for dev, bench, tests and chaos: PostgreSQL, Consul agents, nodes, one cluster harness.

Never imported by the runtime (``core``, ``node``, ``coordinator``, ``web``).
"""
