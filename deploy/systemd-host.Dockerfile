# A Debian host that boots systemd, with pilotfish installed by the README's
# "systemd services" commands: tests/deploy/test_systemd.py boots it and runs
# the units for real. Built by deploy/build-systemd-host.sh (context: a
# directory holding the wheel and systemd/).
ARG BASE_IMAGE=pilotfish-base:bookworm
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG EXTRA_CA_CERTS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# No libnss-systemd on purpose: the harder case for DynamicUser= (no name
# or home directory for the dynamic user).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && systemctl disable haproxy.service
COPY . /root/pilotfish
WORKDIR /root/pilotfish
# The README's commands, verbatim but for the pip certificate of a proxied index.
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } >/tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi \
 && python3 -m venv /opt/pilotfish \
 && /opt/pilotfish/bin/pip install --require-hashes -r requirements.lock \
 && /opt/pilotfish/bin/pip install --no-deps pilotfish-*.whl \
 && rm -f /tmp/ca.pem
RUN install -m 0644 systemd/pilotfish-registrar.service systemd/pilotfish-discoverer.service /etc/systemd/system/ \
 && install -D -m 0640 systemd/registrar.env.example  /etc/pilotfish/registrar.env \
 && install -D -m 0640 systemd/discoverer.env.example /etc/pilotfish/discoverer.env
# `docker stop` halts systemd cleanly.
STOPSIGNAL SIGRTMIN+3
# On a host, systemd makes / a shared mount at boot; in a container it leaves
# that to the container manager, and docker does not. Without it the
# credentials systemd mounts for LoadCredential= stay invisible to the
# service (an empty root-only directory: "Permission denied").
CMD ["/bin/sh", "-c", "mount --make-rshared / && exec /lib/systemd/systemd"]
