# A tiny local etcd image from Debian's etcd-server, for running the compose
# demo where no registry (quay.io/coreos/etcd) can be reached:
#   docker build --network host -f compose/etcd.Dockerfile -t pilotfish-etcd:bookworm .
#   ETCD_IMAGE=pilotfish-etcd:bookworm docker-compose -f compose/docker-compose.yml up -d
ARG BASE_IMAGE=pilotfish-base:bookworm
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log /usr/sbin/policy-rc.d \
 && rm -f /usr/bin/etcdctl /usr/bin/etcdutl
USER etcd
EXPOSE 2379 2380
CMD ["etcd", "--data-dir=/tmp/etcd-data", "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://127.0.0.1:2379"]
