# etcd for the HA compose mesh (docker-compose.ha.yml), FROM the same base image as
# shoal's (scripts/base-image), so building it pulls nothing either.
#
# Why the host's binaries: the build has no network, so neither etcd's release tarball
# nor its official image (quay.io/coreos/etcd) can be fetched. Debian's etcd-server and
# etcd-client packages ship static-enough Go binaries (they link libc only), which run
# unchanged on the bookworm base; scripts/docker-build copies /usr/bin/etcd and
# /usr/bin/etcdctl (SHOAL_ETCD_BIN, SHOAL_ETCDCTL_BIN) into the build context.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
LABEL io.shoal.image="etcd"

COPY etcd etcdctl /usr/local/bin/
# The data directory belongs to the etcd user: each member's compose volume mounts
# there, and Docker gives a new volume this owner and mode. The member's certificates
# come from the shoal image's mesh-ca, in a volume it made (uid and gid 10001, key mode
# 0640): etcd reads them as a member of that group, and stays a user of its own.
RUN groupadd --system --gid 10001 shoal-tls \
    && useradd --system --uid 10002 --groups shoal-tls --no-create-home etcd \
    && install -d -o etcd -g etcd -m 0700 /var/lib/etcd
ENV ETCDCTL_API=3
USER etcd
ENTRYPOINT ["etcd"]
