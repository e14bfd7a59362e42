-- Start the next attempt of one task if it is free to run. ARGV: prefix, task id, instance,
-- now. Reply: the claimed task without logs, or nil.

local id, instance, now = ARGV[2], ARGV[3], ARGV[4]
local old = read_state(id)
if old == nil or old.status ~= 'PENDING' or old.cancel then return false end
if old.owner and old.owner ~= instance then return false end
if old.scheduled and tonumber(old.scheduled) > tonumber(now) then return false end

start_attempt(old, instance, now)
return record_reply(id, false)
