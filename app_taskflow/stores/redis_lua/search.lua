-- Find the tasks that may match a search and that match the other filters, scanning the
-- union of the position sets in KEYS in list order. ARGV: prefix, order ('newest' or
-- 'oldest'), the position to start after ('' for the start), text, the most tasks to scan,
-- the most candidates to reply with, statuses, name, then tag keys and values in pairs.
-- text is '' for no search, or '=' followed by lower-case ASCII without quotes,
-- backslashes or control characters; '=' alone makes every task a candidate. A task is a
-- candidate when one of its searched fields or log entries contains text in ASCII lower
-- case, or contains a non-ASCII byte, whose case folding only Python gets right. So
-- candidates include every match, and Python checks them exactly.
-- statuses ('' for any) is a space-separated list, and name is optional ('' for any).
-- With tags, KEYS are the position sets of those tags, and only the smallest is scanned.
-- Reply: {last position scanned or nil, 1 when the sets hold no more tasks, candidates}, the
-- candidates as a JSON array of {"task": summary fields, "logs": [log entries]}; logs is
-- empty when there is no search.

local newest = ARGV[2] == 'newest'
local after, text = ARGV[3], optional(ARGV[4])
local scan_limit, candidate_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local name = optional(ARGV[8])

local statuses = false
if ARGV[7] ~= '' then
  statuses = {}
  for status in string.gmatch(ARGV[7], '%S+') do statuses[status] = true end
end

local tags = {}
local scanned_keys = KEYS
if #ARGV > 8 then
  for i = 9, #ARGV, 2 do tags[ARGV[i]] = ARGV[i + 1] end
  -- A task with every tag is in every tag's set, so the smallest set contains them all.
  local smallest, smallest_size = KEYS[1], redis.call('ZCARD', KEYS[1])
  for i = 2, #KEYS do
    local size = redis.call('ZCARD', KEYS[i])
    if size < smallest_size then smallest, smallest_size = KEYS[i], size end
  end
  scanned_keys = {smallest}
end

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
for _, key in ipairs(scanned_keys) do
  local page = range(key)
  complete = complete and #page < scan_limit
  for _, position in ipairs(page) do positions[#positions + 1] = position end
end
if #scanned_keys > 1 then table.sort(positions, newest and follows or precedes) end

local function may_contain(value)
  if not value then return false end
  if string.find(value, '[\128-\255]') then return true end
  return string.find(string.lower(value), text, 1, true) ~= nil
end

local function passes_filters(summary)
  if statuses and not statuses[summary.status] then return false end
  if name and summary.name ~= name then return false end
  if next(tags) == nil then return true end
  local task_tags = summary.tags and cjson.decode(summary.tags) or {}
  for key, value in pairs(tags) do
    if task_tags[key] ~= value then return false end
  end
  return true
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
  local found = passes_filters(summary)
  local logs = {}
  if found and text then
    found = text == ''
    for _, field_name in ipairs(SEARCHED_FIELDS) do
      if found then break end
      found = may_contain(summary[field_name])
    end
    logs = redis.call('LRANGE', logs_key(id), 0, -1)
    for _, entry in ipairs(logs) do
      if found then break end
      found = may_contain(entry)
    end
  end
  if found then
    candidates[#candidates + 1] = '{"task":' .. cjson.encode(summary) .. ',"logs":'
      .. json_array(logs) .. '}'
  end
end

local exhausted = 0
if complete and scanned == #positions then exhausted = 1 end
return {last, exhausted, json_array(candidates)}
