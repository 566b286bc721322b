"""Mesh identity: SPIFFE IDs, the mesh's CA, and join tokens (no gRPC here).

A mesh has a trust domain and a CA (``ca``): a root and an issuing key under it. A
workload proves which service it is with a join token (``tokens``) bound to one
service, and gets a short-lived leaf certificate whose one URI SAN is its SPIFFE ID
(``spiffe``).
"""
