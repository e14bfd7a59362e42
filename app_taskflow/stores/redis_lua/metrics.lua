-- Reply with {counts, durations}: counts as "STATUS:name"-count pairs, and durations as
-- pairs of a name and the durations of its most recently finished tasks, joined by spaces.

local counts = redis.call('HGETALL', COUNTS)
local durations = {}
local seen = {}
for i = 1, #counts, 2 do
  local name = string.sub(counts[i], string.find(counts[i], ':', 1, true) + 1)
  if not seen[name] then
    seen[name] = true
    local values = {}
    for j, member in ipairs(redis.call('ZRANGE', durations_key(name), 0, -1)) do
      values[j] = string.match(member, '^%S+')
    end
    durations[#durations + 1] = name
    durations[#durations + 1] = table.concat(values, ' ')
  end
end
return {counts, durations}
