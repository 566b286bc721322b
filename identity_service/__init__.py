"""The identity server: certifies workloads with the mesh CA's issuing key."""
