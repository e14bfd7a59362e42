-- Renew the lease of an instance and reply with the ids of its RUNNING tasks whose cancel
-- was requested. ARGV: prefix, instance, expires_at.

local instance = ARGV[2]
redis.call('ZADD', LEASES, ARGV[3], instance)
local ids = {}
for _, position in ipairs(redis.call('ZRANGE', cancelling_key(instance), 0, -1)) do
  ids[#ids + 1] = id_of(position)
end
return ids
