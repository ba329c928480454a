"""A lease in Redis: one replica of many does a job (reads the event stream, delivers
notifications) while it renews the lease; when it stops renewing, another takes over
once the lease expires."""

from __future__ import annotations

from rankgate.core.redis_server import AsyncRedisClient, register_async_script

# Take the lease, or renew it when it is ours. KEYS: lease; ARGV: name, ms.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Lease:
    """The lease `key`, held by `holder` (a name unique to the replica) while renewed."""

    def __init__(self, client: AsyncRedisClient, key: str, holder: str) -> None:
        self.client = client
        self.key = key
        self.holder = holder
        self.script = register_async_script(client, LEASE)

    async def hold(self, lease_s: float) -> bool:
        """Take or renew the lease for `lease_s`; False while another holder has it."""
        return bool(await self.script(keys=[self.key], args=[self.holder, int(lease_s * 1000)]))

    async def release(self) -> None:
        """Give the lease up, when it is ours (a successor need not wait for it to expire)."""
        if (await self.client.get(self.key)) == self.holder.encode():
            await self.client.delete(self.key)
