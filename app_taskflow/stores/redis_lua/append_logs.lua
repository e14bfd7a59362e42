-- Append log entries to a task; unknown ids are ignored. ARGV: prefix, task id, entries...

local id = ARGV[2]
if redis.call('EXISTS', task_key(id)) == 0 then return 0 end
for first = 3, #ARGV, 1000 do
  redis.call('RPUSH', logs_key(id), unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
for i = 3, #ARGV do publish('L' .. id .. '\n' .. ARGV[i]) end
return 1
