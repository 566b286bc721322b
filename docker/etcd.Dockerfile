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
# there, and Docker gives a new volume this owner and mode.
RUN useradd --system --uid 10002 --no-create-home etcd \
    && install -d -o etcd -g etcd -m 0700 /var/lib/etcd
ENV ETCDCTL_API=3
USER etcd
ENTRYPOINT ["etcd"]
