-- Find the tasks that may contain a text, scanning the union of the position sets in KEYS
-- in list order. ARGV: prefix, order ('newest' or 'oldest'), the position to start after
-- ('' for the start), text, the most tasks to scan, the most candidates to reply with.
-- text is lower-case ASCII without quotes, backslashes or control characters, or '' to make
-- every task a candidate. A task is a candidate when one of its searched fields or log
-- entries contains text in ASCII lower case, or contains a non-ASCII byte, whose case
-- folding only Python gets right. So candidates include every match, and Python checks
-- them exactly.
-- Reply: {last position scanned or nil, 1 when the sets hold no more tasks, candidates}, the
-- candidates as a JSON array of {"task": summary fields, "logs": [log entries]}.

local newest = ARGV[2] == 'newest'
local after, text = ARGV[3], ARGV[4]
local scan_limit, candidate_limit = tonumber(ARGV[5]), tonumber(ARGV[6])

local function range(key)
  if after == '' then
    if newest then return redis.call('ZRANGE', key, 0, scan_limit - 1, 'REV') end
    return redis.call('ZRANGE', key, 0, scan_limit - 1)
  end
  if newest then
    return redis.call('ZRANGE', key, '(' .. after, '-', 'BYLEX', 'REV', 'LIMIT', 0, scan_limit)
  end
  return redis.call('ZRANGE', key, '(' .. after, '+', 'BYLEX', 'LIMIT', 0, scan_limit)
end

local positions = {}
local complete = true
for _, key in ipairs(KEYS) do
  local page = range(key)
  complete = complete and #page < scan_limit
  for _, position in ipairs(page) do positions[#positions + 1] = position end
end
if #KEYS > 1 then table.sort(positions, newest and follows or precedes) end

local function may_contain(value)
  if not value then return false end
  if string.find(value, '[\128-\255]') then return true end
  return string.find(string.lower(value), text, 1, true) ~= nil
end

local SEARCHED_FIELDS = {'id', 'name', 'args', 'kwargs', 'error_type', 'error_message'}

local candidates = {}
local last = false
local scanned = 0
for _, position in ipairs(positions) do
  if scanned >= scan_limit or #candidates >= candidate_limit then break end
  scanned = scanned + 1
  last = position
  local id = id_of(position)
  local summary = summary_of(id)
  local found = text == ''
  for _, name in ipairs(SEARCHED_FIELDS) do
    if found then break end
    found = may_contain(summary[name])
  end
  local logs = redis.call('LRANGE', logs_key(id), 0, -1)
  for _, entry in ipairs(logs) do
    if found then break end
    found = may_contain(entry)
  end
  if found then
    candidates[#candidates + 1] = '{"task":' .. cjson.encode(summary) .. ',"logs":'
      .. json_array(logs) .. '}'
  end
end

local exhausted = 0
if complete and scanned == #positions then exhausted = 1 end
return {last, exhausted, json_array(candidates)}
