-- Reply with the summaries of one page of tasks as a JSON array, taken from the union of
-- the position sets in KEYS. ARGV: prefix, order ('newest' or 'oldest'), the position to start after ('' for
-- the start), offset, count.

local newest = ARGV[2] == 'newest'
local after = ARGV[3]
local offset = tonumber(ARGV[4])
local count = tonumber(ARGV[5])

local function range(key, skip, take)
  if after ~= '' then
    if newest then
      return redis.call('ZRANGE', key, '(' .. after, '-', 'BYLEX', 'REV', 'LIMIT', skip, take)
    end
    return redis.call('ZRANGE', key, '(' .. after, '+', 'BYLEX', 'LIMIT', skip, take)
  end
  if newest then return redis.call('ZRANGE', key, skip, skip + take - 1, 'REV') end
  return redis.call('ZRANGE', key, skip, skip + take - 1)
end

local positions
if #KEYS == 1 then
  positions = range(KEYS[1], offset, count)
else
  -- Each set is sorted, so the page lies within the first offset + count of each.
  local merged = {}
  for _, key in ipairs(KEYS) do
    for _, position in ipairs(range(key, 0, offset + count)) do
      merged[#merged + 1] = position
    end
  end
  table.sort(merged, newest and follows or precedes)
  positions = {}
  for i = offset + 1, math.min(#merged, offset + count) do
    positions[#positions + 1] = merged[i]
  end
end

local summaries = {}
for i, position in ipairs(positions) do
  summaries[i] = cjson.encode(summary_of(id_of(position)))
end
return json_array(summaries)
