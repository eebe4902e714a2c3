#!/bin/sh
# Entry point of the pilotfish images (Dockerfile.register, Dockerfile.discover).
#
#   docker run IMAGE                  -> pilotfish $PILOTFISH_COMMAND (the image's agent)
#   docker run IMAGE --ttl 30         -> pilotfish $PILOTFISH_COMMAND --ttl 30
#   docker run IMAGE register|discover|catalog|upgrade ...  -> pilotfish <that command> ...
#   anything else (sh, pilotfish --version) is run as given.
#
# Settings come from the environment unchanged (HOST_IP, ETCD_HOST,
# DOCKER_HOST, PILOTFISH_*), as in the seed deployment.
#
# Started as root with PILOTFISH_RUN_AS set (the registrar image), it drops to
# that user before the agent starts, adding the group that owns the Docker
# socket so `-v /var/run/docker.sock:/var/run/docker.sock` keeps working
# without --group-add. Started as non-root (`--user 10001 --group-add GID`),
# it just runs the agent.
set -eu

case "${1:-}" in
    register|discover|catalog|upgrade) set -- pilotfish "$@" ;;
    -*) set -- pilotfish "${PILOTFISH_COMMAND:?}" "$@" ;;
    "") set -- pilotfish "${PILOTFISH_COMMAND:?}" ;;
esac

if [ "$(id -u)" = 0 ] && [ -n "${PILOTFISH_RUN_AS:-}" ]; then
    docker_host="${PILOTFISH_DOCKER_HOST:-${DOCKER_HOST:-unix:///var/run/docker.sock}}"
    socket="${docker_host#unix://}"
    groups="$(id -g "$PILOTFISH_RUN_AS")"
    if [ "$socket" != "$docker_host" ] && [ -S "$socket" ]; then
        groups="$groups,$(stat -c %g "$socket")"
    fi
    # Changing the uid away from 0 clears every capability; --inh-caps and
    # --bounding-set make sure nothing can be regained by an exec'd binary.
    exec setpriv --reuid="$PILOTFISH_RUN_AS" --regid="$PILOTFISH_RUN_AS" --groups="$groups" \
        --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
fi
exec "$@"
