-- Delete the leases that expired before now and take back the oldest tasks, at most limit,
-- of every owner without a lease. ARGV: prefix, now, limit.
-- Reply: {released, requeued, interrupted}.

local now, limit = ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', LEASES, '-inf', '(' .. now)
local orphaned = {}
for _, owner in ipairs(redis.call('SMEMBERS', OWNERS)) do
  if not redis.call('ZSCORE', LEASES, owner) then orphaned[#orphaned + 1] = owner end
end
return take_back_owners(orphaned, now, limit)
