"""The host id claim in etcd: made on every lease before any key is written."""

from __future__ import annotations

from agents.common.etcd import Etcd
from agents.common.logging import get_logger
from agents.common.validation import show
from agents.registrar.identity import Holder, claim_key

log = get_logger("pilotfish.claim")


class HostIdTaken(Exception):
    """Another registrar holds this host id: going on would delete its keys."""


class HostClaim:
    def __init__(self, etcd: Etcd, prefix: str, host_id: str, holder: Holder) -> None:
        self.etcd = etcd
        self.host_id = host_id
        self.key = claim_key(prefix, host_id)
        self.holder = holder
        # The lease of this engine's last registrar, when the last make() took
        # its claim over (None: the claim was made afresh): its keys are this
        # host's keys, so a restart need not list the whole prefix.
        self.taken_over_lease: int | None = None

    async def make(self, lease: int) -> None:
        """Hold the claim on ``lease``: create it, or take it over from our own last run.

        Raises :class:`HostIdTaken` (after one log line naming the holder) if
        a registrar of another engine holds it; etcd errors are the caller's.
        """
        seen = 0  # the mod_revision the claim is expected to have; 0: absent
        self.taken_over_lease = None
        while True:
            put, current = await self.etcd.put_if(
                self.key, self.holder.to_json(), mod_revision=seen, lease=lease
            )
            if put:
                return
            if current is None:
                seen = 0  # gone meanwhile (its lease expired): create it
                continue
            holder = Holder.parse(current.value)
            if holder is None or not holder.same_engine(self.holder):
                named = holder.describe() if holder else f"unreadable claim {show(current.value)}"
                log.error(
                    "host id is held by another registrar: stopping, or each would "
                    "delete the other's keys; give this host its own --host-id",
                    host_id=self.host_id,
                    key=self.key,
                    holder=named,
                )
                raise HostIdTaken(f"host id {self.host_id} is held by {named}")
            if current.lease != lease:
                self.taken_over_lease = current.lease or None
                log.info(
                    "host id claim taken over from this engine's last registrar",
                    host_id=self.host_id,
                    previous=holder.describe(),
                )
            seen = current.mod_revision
